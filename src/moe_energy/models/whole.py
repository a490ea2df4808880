"""Whole published LLMs as plain data, and the transformers models built from them with random weights.

Issue 23 asks "Qwen3-30B-A3B or dense Qwen3-32B?" at a batch, context and deadline: that needs whole models
(attention, embeddings, KV cache), not one MoE layer. Each ``WholeModel`` holds a checkpoint's published
``config.json`` values (named in ``source``; written from the published files, not downloaded, and read with
transformers 5.24.0's configuration classes, whose defaults fill what a preset leaves out). The MoE layers
name their ``archs.py`` preset, so the layer and the whole model agree on the experts and the router.

Nothing here downloads: ``build_model`` makes the ``*ForCausalLM`` from its config with seeded random weights
(an energy benchmark needs the shapes and the routing, not trained values), ``param_counts`` and
``memory_bytes`` count on the meta device without allocating.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..dtypes import dtype_of
from ..errors import ConfigError, check_choice, kind_of
from .archs import MAX_BATCH, Arch, get_arch, whole
from .families import FAMILIES
from .llm import building

# transformers' decoder-layer kwarg that makes the listed layers dense, per family (others have no dense layers)
_DENSE_KWARG = {"deepseek_v2": "first_k_dense_replace", "qwen3_moe": "mlp_only_layers"}
_HF = "huggingface.co/"
_READ = "; values written from the published config.json (not downloaded), defaults from transformers 5.24.0's "


@dataclass(frozen=True)
class Published:
    """The publisher's own parameter counts, as printed ("30.5B"), and which embeddings their active count has:
    "all" (embedding and output head), "output" (the head only: the embedding is a lookup, not a product)."""

    total: str
    active: str
    where: str
    active_counts: str = "all"


@dataclass(frozen=True)
class WholeModel:
    """One decoder-only LLM: its shape, which layers are MoE (and their ``archs.py`` layer), its transformers
    classes. ``moe_arch`` is None for a dense model; ``dense_layers`` are the MoE model's dense-FFN layers."""

    name: str
    family: str  # transformers model_type: transformers.models.<family>
    config_class: str
    model_class: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int  # MLA (DeepSeek): the query/key head, qk_nope + qk_rope
    vocab: int
    max_positions: int
    ffn_dim: int  # the dense FFN's SwiGLU width (dense layers); 0 when every layer is MoE
    tied_embeddings: bool
    moe_arch: str | Arch | None = None
    dense_layers: tuple[int, ...] = ()
    siblings: tuple[str, ...] = ()  # dense models to compare an MoE against
    rope: tuple[tuple[str, Any], ...] = ()  # rope_parameters
    extra: tuple[tuple[str, Any], ...] = ()  # other config.json values (norm eps, sliding window, MLA ranks)
    published: Published | None = None
    source: str = "custom"

    def __post_init__(self) -> None:
        check_model(self)

    @property
    def arch(self) -> Arch | None:
        """The MoE layers' shape (None: a dense model)."""
        return get_arch(self.moe_arch) if isinstance(self.moe_arch, str) else self.moe_arch

    @property
    def moe_layers(self) -> int:
        return 0 if self.moe_arch is None else self.layers - len(self.dense_layers)


def check_model(m: WholeModel) -> WholeModel:
    """Every field in range and the MoE layer's shape the model's: a one-line ConfigError otherwise."""
    where = f"model {m.name!r}"
    for f in ("layers", "d_model", "heads", "kv_heads", "head_dim", "vocab", "max_positions"):
        whole(where, f, getattr(m, f))
    whole(where, "ffn_dim", m.ffn_dim, least=0 if m.moe_arch is not None and not m.dense_layers else 1)
    if m.heads % m.kv_heads:
        raise ConfigError(f"{where}: kv_heads={m.kv_heads} does not divide heads={m.heads}")
    if m.moe_arch is None:
        if m.dense_layers:
            raise ConfigError(f"{where}: dense_layers={m.dense_layers} needs moe_arch (a dense model is all dense)")
        return m
    a = m.arch
    if a.d_model != m.d_model:
        raise ConfigError(f"{where}: moe_arch {a.name!r} has d_model={a.d_model}, the model {m.d_model}")
    if any(not 0 <= i < m.layers for i in m.dense_layers) or len(set(m.dense_layers)) != len(m.dense_layers):
        raise ConfigError(f"{where}: dense_layers={m.dense_layers} must be distinct layers 0 to {m.layers - 1}")
    kwarg = _DENSE_KWARG.get(m.family)
    if m.dense_layers and (kwarg is None or (kwarg == "first_k_dense_replace"
                                             and m.dense_layers != tuple(range(len(m.dense_layers))))):
        raise ConfigError(f"{where}: transformers' {m.family} cannot make layers {m.dense_layers} dense")
    return m


def _pairs(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kw.items())


def _rope(theta: float, **kw: Any) -> tuple[tuple[str, Any], ...]:
    return _pairs(rope_type=kw.pop("rope_type", "default"), rope_theta=theta, **kw)


_QWEN3 = dict(family="qwen3", config_class="Qwen3Config", model_class="Qwen3ForCausalLM", head_dim=128,
              vocab=151936, max_positions=40960, rope=_rope(1e6), extra=_pairs(rms_norm_eps=1e-6))
_QWEN3_MOE = dict(_QWEN3, family="qwen3_moe", config_class="Qwen3MoeConfig", model_class="Qwen3MoeForCausalLM",
                  ffn_dim=0, tied_embeddings=False, siblings=("qwen3-32b", "qwen3-14b", "qwen3-4b"))
_OLMO2 = dict(family="olmo2", config_class="Olmo2Config", model_class="Olmo2ForCausalLM", head_dim=128,
              vocab=100352, max_positions=4096, tied_embeddings=False, rope=_rope(500000.0),
              extra=_pairs(rms_norm_eps=1e-6))
_QWEN_CARD = "model card (Number of Parameters)"

MODELS: dict[str, WholeModel] = {m.name: m for m in (
    # -- MoE -------------------------------------------------------------------------------------------------
    WholeModel("olmoe-1b-7b", "olmoe", "OlmoeConfig", "OlmoeForCausalLM", 16, 2048, 16, 16, 128, 50304, 4096, 0,
               False, moe_arch="olmoe-1b-7b", siblings=("olmo-2-7b", "olmo-2-1b"), rope=_rope(10000.0),
               extra=_pairs(rms_norm_eps=1e-5, clip_qkv=None),
               published=Published("6.9B", "1.3B", "OLMoE paper, arXiv 2409.02060, Table 1"),
               source=_HF + "allenai/OLMoE-1B-7B-0924" + _READ + "OlmoeConfig"),
    WholeModel("qwen3-30b-a3b", layers=48, d_model=2048, heads=32, kv_heads=4, moe_arch="qwen3-30b-a3b",
               **(_QWEN3_MOE | {"extra": _pairs(rms_norm_eps=1e-6, intermediate_size=6144)}),
               published=Published("30.5B", "3.3B", _HF + "Qwen/Qwen3-30B-A3B " + _QWEN_CARD),
               source=_HF + "Qwen/Qwen3-30B-A3B" + _READ + "Qwen3MoeConfig (head_dim is no field of it: passed)"),
    WholeModel("qwen3-235b-a22b", layers=94, d_model=4096, heads=64, kv_heads=4, moe_arch="qwen3-235b-a22b",
               **(_QWEN3_MOE | {"extra": _pairs(rms_norm_eps=1e-6, intermediate_size=12288)}),
               published=Published("235B", "22B", _HF + "Qwen/Qwen3-235B-A22B " + _QWEN_CARD),
               source=_HF + "Qwen/Qwen3-235B-A22B" + _READ + "Qwen3MoeConfig"),
    WholeModel("mixtral-8x7b", "mixtral", "MixtralConfig", "MixtralForCausalLM", 32, 4096, 32, 8, 128, 32000,
               32768, 0, False, moe_arch="mixtral-8x7b", siblings=("mistral-7b", "llama-3.1-70b"),
               rope=_rope(1e6), extra=_pairs(rms_norm_eps=1e-5, sliding_window=None),
               published=Published("46.7B", "12.9B", "mistral.ai/news/mixtral-of-experts"),
               source=_HF + "mistralai/Mixtral-8x7B-v0.1" + _READ + "MixtralConfig"),
    WholeModel("deepseek-v2-lite", "deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", 27, 2048, 16, 16,
               192, 102400, 163840, 10944, False, moe_arch="deepseek-v2-lite", dense_layers=(0,),
               siblings=("qwen3-8b",),
               rope=_rope(10000.0, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                          beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
               extra=_pairs(rms_norm_eps=1e-6, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128),
               published=Published("15.7B", "2.4B", _HF + "deepseek-ai/DeepSeek-V2-Lite model card", "output"),
               source=_HF + "deepseek-ai/DeepSeek-V2-Lite" + _READ + "DeepseekV2Config (MLA; first_k_dense_replace 1)"),
    WholeModel("gpt-oss-20b", "gpt_oss", "GptOssConfig", "GptOssForCausalLM", 24, 2880, 64, 8, 64, 201088, 131072,
               0, False, moe_arch="gpt-oss-20b", siblings=("qwen3-8b",),
               rope=_rope(150000.0, rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=4096),
               extra=_pairs(rms_norm_eps=1e-5, sliding_window=128, attention_bias=True, swiglu_limit=7.0),
               published=Published("20.9B", "3.6B", "gpt-oss model card, arXiv 2508.10925, Table 1", "output"),
               source=_HF + "openai/gpt-oss-20b" + _READ + "GptOssConfig (layer_types: sliding/full alternating)"),
    # -- dense siblings --------------------------------------------------------------------------------------
    WholeModel("olmo-2-7b", layers=32, d_model=4096, heads=32, kv_heads=32, ffn_dim=11008, **_OLMO2,
               published=Published("7.3B", "7.3B", _HF + "allenai/OLMo-2-1124-7B (safetensors count)"),
               source=_HF + "allenai/OLMo-2-1124-7B" + _READ + "Olmo2Config"),
    WholeModel("olmo-2-1b", layers=16, d_model=2048, heads=16, kv_heads=16, ffn_dim=8192, **_OLMO2,
               published=Published("1.48B", "1.48B", _HF + "allenai/OLMo-2-0425-1B (safetensors count)"),
               source=_HF + "allenai/OLMo-2-0425-1B" + _READ + "Olmo2Config"),
    WholeModel("qwen3-32b", layers=64, d_model=5120, heads=64, kv_heads=8, ffn_dim=25600, tied_embeddings=False,
               **_QWEN3, published=Published("32.8B", "32.8B", _HF + "Qwen/Qwen3-32B " + _QWEN_CARD),
               source=_HF + "Qwen/Qwen3-32B" + _READ + "Qwen3Config"),
    WholeModel("qwen3-14b", layers=40, d_model=5120, heads=40, kv_heads=8, ffn_dim=17408, tied_embeddings=False,
               **_QWEN3, published=Published("14.8B", "14.8B", _HF + "Qwen/Qwen3-14B " + _QWEN_CARD),
               source=_HF + "Qwen/Qwen3-14B" + _READ + "Qwen3Config"),
    WholeModel("qwen3-8b", layers=36, d_model=4096, heads=32, kv_heads=8, ffn_dim=12288, tied_embeddings=False,
               **_QWEN3, published=Published("8.2B", "8.2B", _HF + "Qwen/Qwen3-8B " + _QWEN_CARD),
               source=_HF + "Qwen/Qwen3-8B" + _READ + "Qwen3Config"),
    WholeModel("qwen3-4b", layers=36, d_model=2560, heads=32, kv_heads=8, ffn_dim=9728, tied_embeddings=True,
               **_QWEN3, published=Published("4.0B", "4.0B", _HF + "Qwen/Qwen3-4B " + _QWEN_CARD),
               source=_HF + "Qwen/Qwen3-4B" + _READ + "Qwen3Config (tie_word_embeddings true)"),
    WholeModel("mistral-7b", "mistral", "MistralConfig", "MistralForCausalLM", 32, 4096, 32, 8, 128, 32000, 32768,
               14336, False, rope=_rope(10000.0), extra=_pairs(rms_norm_eps=1e-5, sliding_window=4096),
               published=Published("7.3B", "7.3B", "mistral.ai/news/announcing-mistral-7b"),
               source=_HF + "mistralai/Mistral-7B-v0.1" + _READ + "MistralConfig (sliding_window 4096)"),
    WholeModel("llama-3.1-70b", "llama", "LlamaConfig", "LlamaForCausalLM", 80, 8192, 64, 8, 128, 128256, 131072,
               28672, False, rope=_rope(500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192),
               extra=_pairs(rms_norm_eps=1e-5),
               published=Published("70.6B", "70.6B", _HF + "meta-llama/Llama-3.1-70B (safetensors count)"),
               source=_HF + "meta-llama/Llama-3.1-70B" + _READ + "LlamaConfig"),
)}


def models() -> dict[str, WholeModel]:
    """Every whole-model preset by name (a copy)."""
    return dict(MODELS)


def get_model(name: str | WholeModel) -> WholeModel:
    """A preset by name (a WholeModel passes through), or a one-line ConfigError naming the choices."""
    if isinstance(name, WholeModel):
        return name
    if not isinstance(name, str):
        raise TypeError(f"model={name!r} is {kind_of(name)}; give a preset's name or a WholeModel")
    check_choice("model", name, MODELS)
    return MODELS[name]


def check_layers(m: WholeModel, layers: int | None) -> int:
    """``layers`` (None: all of them) as 1 to the model's count, or a one-line ConfigError."""
    if layers is None:
        return m.layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= m.layers:
        raise ConfigError(f"model {m.name!r}: layers={layers!r} must be a whole number from 1 to {m.layers}")
    return layers


def check_context(m: WholeModel, batch: int, context: int) -> None:
    """The decoded token sits at position ``context``: it must be a position the model has; ``batch`` at most
    MAX_BATCH sequences (the bound of --batch-size)."""
    whole(f"model {m.name!r}", "batch", batch)
    if batch > MAX_BATCH:
        raise ConfigError(f"model {m.name!r}: batch={batch} is too large; give at most {MAX_BATCH:.0e} sequences per "
                          "step")
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context < m.max_positions:
        raise ConfigError(f"model {m.name!r}: context={context!r} must be a whole number from 1 to "
                          f"{m.max_positions - 1} (max_position_embeddings {m.max_positions}, one left to decode)")


def tiny(model: str | WholeModel, layers: int | None = None, d_model: int = 64, vocab: int = 256) -> WholeModel:
    """``model`` scaled down to run in milliseconds on a CPU, keeping what makes it that model: its router,
    shared experts, expert biases, dense-layer pattern, MLA, sliding windows (8 tokens) and tied embeddings.
    4 heads (2 KV heads where the model groups them) of d_model / 4, 8 experts of width 32 with top-2, a dense
    width of 96, 2 layers unless ``layers`` says."""
    m = get_model(model)
    n = min(m.layers, 2 if layers is None else layers)
    extra = dict(m.extra)
    mla = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    extra.update({k: v for k, v in mla.items() if k in extra})
    extra.update({k: 8 for k in ("sliding_window",) if extra.get(k)})
    extra.pop("intermediate_size", None)
    extra["eos_token_id"] = None  # OLMo's default (50279) is past the tiny vocabulary
    head = 24 if "kv_lora_rank" in extra else d_model // 4  # MLA: qk_nope + qk_rope; OLMoE norms need 4 x head = d
    a = m.arch
    if a is not None:
        n_dense = len([i for i in m.dense_layers if i < n])
        a = replace(a, name=f"{a.name}-tiny", d_model=d_model, ffn_dim=32, experts=8, top_k=2,
                    shared_width=32 if a.shared_experts else 0, moe_layers=max(n - n_dense, 1),
                    dense_layers=n_dense, dense_ffn_dim=96 if n_dense else 0)
    return replace(m, name=f"{m.name}-tiny", layers=n, d_model=d_model, heads=4,
                   kv_heads=4 if m.kv_heads == m.heads else 2, head_dim=head, vocab=vocab,
                   ffn_dim=96 if m.ffn_dim else 0, moe_arch=a, dense_layers=tuple(i for i in m.dense_layers if i < n),
                   extra=tuple(extra.items()), published=None, source=f"{m.name} scaled down (tiny)")


def config_for(model: str | WholeModel, layers: int | None = None) -> Any:
    """The transformers config of ``model``'s first ``layers`` layers (None: all), each layer what it is in the
    full model (DeepSeek's first dense layer, gpt-oss's sliding/full alternation)."""
    m = get_model(model)
    n = check_layers(m, layers)
    kw: dict[str, Any] = {"vocab_size": m.vocab, "hidden_size": m.d_model, "num_hidden_layers": n,
                          "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
                          "max_position_embeddings": m.max_positions, "tie_word_embeddings": m.tied_embeddings}
    if m.family != "deepseek_v2":  # its config derives head_dim from the MLA dims; elsewhere it is read as given
        kw["head_dim"] = m.head_dim
    if m.ffn_dim:
        kw["intermediate_size"] = m.ffn_dim
    kw.update(dict(m.extra))
    if m.rope:
        kw["rope_parameters"] = dict(m.rope)
    if m.arch is not None:
        kw.update(_moe_kwargs(m, n))
    if "layer_types" in kw:
        kw["layer_types"] = list(kw["layer_types"])[:n]
    return getattr(_transformers(), m.config_class)(**kw)


def _moe_kwargs(m: WholeModel, n: int) -> dict[str, Any]:
    """The MoE layers' config keys, as models/families.py writes them for the family's block, and the dense layers'."""
    kw = FAMILIES[m.family].kwargs(m.arch)
    dense = [i for i in m.dense_layers if i < n]
    if m.family == "deepseek_v2":
        kw["first_k_dense_replace"] = len(dense)
    elif m.family == "qwen3_moe":
        kw["mlp_only_layers"] = dense
    return kw


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise ConfigError("whole models need transformers (pip install 'moe-energy[test]', which pins 5.24.0)") from e


def build_model(name_or_model: str | WholeModel, layers: int | None = None, dtype: str | torch.dtype = "float32",
                device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """The ``*ForCausalLM`` with transformers' own random init from an RNG seeded with ``seed``, allocated on
    ``device`` in ``dtype`` (one copy, no fp32 one first). Parameters transformers keeps in fp32 when it loads
    a checkpoint in 16 bits (``_keep_in_fp32_modules_strict``: DeepSeek's router) are made fp32 the same way."""
    m = get_model(name_or_model)
    config = config_for(m, layers)
    dt, dev = dtype_of(dtype), torch.device(device)
    whole(f"model {m.name!r}", "seed", seed, least=0)
    with building(dev, dt, seed):
        model = getattr(_transformers(), m.model_class)._from_config(config, dtype=dt)
    _keep_fp32(model, dt)
    return model.eval()


def _keep_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """from_pretrained's dtype plan for a 16-bit load: the strict fp32 modules' parameters in fp32."""
    keys = getattr(model, "_keep_in_fp32_modules_strict", None)
    if not keys or dtype not in (torch.float16, torch.bfloat16):
        return
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(k) for k in keys) + r")($|\.)")
    for name, p in model.named_parameters():
        if pattern.search(name):
            p.data = p.data.float()


@dataclass(frozen=True)
class _Census:
    """Parameters (and bytes) outside the decoder layers and of each layer; routed-expert parameters a token
    leaves unused in each layer. Sums over the first N layers give any ``layers=N`` exactly."""

    base: int
    base_bytes: int
    layer: tuple[int, ...]
    layer_bytes: tuple[int, ...]
    unused: tuple[int, ...]


_CENSUS: dict[tuple[str, torch.dtype], _Census] = {}


def _census(m: WholeModel, dtype: torch.dtype) -> _Census:
    key = (repr(m), dtype)
    if key not in _CENSUS:
        _CENSUS[key] = _count_on_meta(m, dtype)
    return _CENSUS[key]


def _count_on_meta(m: WholeModel, dtype: torch.dtype) -> _Census:
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = getattr(_transformers(), m.model_class)._from_config(config_for(m), dtype=dtype)
    model.tie_weights()  # init_weights ties them, and no_init_weights skips it
    _keep_fp32(model, dtype)
    block = FAMILIES[m.family].block if m.arch is not None else None
    layers, layer_bytes, unused = [], [], []
    for layer in model.model.layers:
        layers.append(sum(p.numel() for p in layer.parameters()))
        layer_bytes.append(sum(p.numel() * p.element_size() for p in layer.parameters()))
        experts = [mod.experts for mod in layer.modules() if type(mod).__name__ == block]
        routed = sum(p.numel() for ex in experts for p in ex.parameters())
        unused.append(routed // m.arch.experts * (m.arch.experts - m.arch.top_k) if experts else 0)
    total = sum(p.numel() for p in model.parameters())  # a tied head counted once
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return _Census(total - sum(layers), total_bytes - sum(layer_bytes), tuple(layers), tuple(layer_bytes),
                   tuple(unused))


def param_counts(model: str | WholeModel, layers: int | None = None) -> tuple[int, int]:
    """(total, active) parameters of the model's first ``layers`` layers, counted on the meta device.

    Active is the total less the routed experts a token does not use ((E - k) of E in each MoE layer): both
    embeddings count, as the total does. Some publishers leave the input embedding out of their active figure
    (``Published.active_counts``)."""
    m = get_model(model)
    n = check_layers(m, layers)
    c = _census(m, torch.float32)
    total = c.base + sum(c.layer[:n])
    return total, total - sum(c.unused[:n])


def forward_flops(model: str | WholeModel, layers: int | None, phase: str, batch: int, context: int) -> float:
    """The matrix FLOPs of one call of ``phase`` at (B, L) on the first ``layers`` layers: 2 x each token's active
    parameters in those layers (B x L tokens in a prefill, B in a decode step) and the LM head's (vocab x d_model)
    for the B positions whose logits are kept. The embedding lookup is a gather, no matrix work; attention's
    context-dependent products are not counted."""
    m = get_model(model)
    n = check_layers(m, layers)
    c = _census(m, torch.float32)
    work = sum(t - u for t, u in zip(c.layer[:n], c.unused[:n]))  # active parameters of the layers built
    tokens = batch * context if phase == "prefill" else batch
    return 2.0 * (work * tokens + m.vocab * m.d_model * batch)


def extrapolation_scale(model: str | WholeModel, layers: int | None, phase: str, context: int) -> float:
    """How many times a token's matrix work in the whole model is that in its first ``layers`` layers
    (``forward_flops``: the LM head counted once per decoded token, 1/L of it per prompt token). A parameter ratio
    would credit a few-layer build with the embeddings' weight and understate a dense 7B built on 1 of 32 layers
    ~4x."""
    return forward_flops(model, None, phase, 1, context) / forward_flops(model, layers, phase, 1, context)


def kv_bytes_per_token(model: str | WholeModel, dtype: str | torch.dtype = "bfloat16") -> int:
    """Bytes one token's keys and values take in one full-attention layer's cache: 2 x kv_heads x head_dim, or
    MLA's compressed latent and rope key (kv_lora_rank + qk_rope_head_dim), which transformers 5.24 caches."""
    m = get_model(model)
    extra = dict(m.extra)
    per = extra["kv_lora_rank"] + extra["qk_rope_head_dim"] if "kv_lora_rank" in extra else 2 * m.kv_heads * m.head_dim
    return per * dtype_of(dtype).itemsize


def _cache_slots(m: WholeModel, n: int, context: int) -> int:
    """Token slots a StaticCache of context + 1 holds over the first ``n`` layers (sliding ones: their window)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config_for(m, n))
    return sum(min(kw.get("sliding_window") or context + 1, context + 1)
               for t, kw in zip(types, kwargs) if t != "dummy")


def memory_bytes(model: str | WholeModel, layers: int | None, dtype: str | torch.dtype, batch: int,
                 context: int, phase: str | None = None) -> dict[str, int]:
    """Device memory a run of ``phase`` at (batch, context) needs (None: a prefill and a decode step, the larger
    of the two allowances), so a caller can pick the largest ``layers`` that fits: ``weights`` (exact, strict-fp32
    parameters included), ``kv_cache`` (exact: the decode step's StaticCache of context + 1 slots, sliding layers
    holding their window) and ``activations``.

    ``activations`` is an allowance, not a measurement, for the tokens one call passes through one layer at a
    time (inference keeps no graph), each holding 6 residual-width vectors, its queries, keys and values, and the
    widest FFN intermediate (dense gate/up/act, or top_k gathered inputs and gate/up/act plus the shared experts),
    plus fp32 logits of the positions kept. A prefill passes B x L tokens and holds its own cache (exact): it
    writes every built layer's keys and values for them (``use_cache``, as serving does), all held until the
    forward ends (a sliding layer keeps a view of them all). A decode step passes B tokens; before its windows,
    its cache is filled by one prompt of L tokens into a one-row StaticCache, held until it is copied to the B
    rows (``generate.decode_step``), so its allowance is the larger of that fill and the step, never B x L tokens.
    It assumes a fused attention kernel (flash / memory efficient, as on a GPU); SDPA's math fallback (a CPU)
    adds B x heads x L x L scores to a prefill. Keep a margin for the allocator.
    """
    if phase is not None:
        check_choice("phase", phase, ("prefill", "decode"))
    m = get_model(model)
    n = check_layers(m, layers)
    check_context(m, batch, context)
    dt = dtype_of(dtype)
    c = _census(m, dt)
    weights = c.base_bytes + sum(c.layer_bytes[:n])
    one_row = _cache_slots(m, n, context) * kv_bytes_per_token(m, dt)  # one sequence's StaticCache
    kv = batch * one_row
    a = m.arch
    moe_width = a.top_k * (a.d_model + 3 * a.ffn_dim) + 3 * a.shared_experts * a.shared_width if a else 0
    per_token = (6 * m.d_model + (m.heads + 2 * m.kv_heads) * m.head_dim + max(3 * m.ffn_dim, moe_width)) \
        * dt.itemsize
    prefill = batch * context * (per_token + n * kv_bytes_per_token(m, dt)) + batch * m.vocab * 4
    fill = context * per_token + m.vocab * 4 + one_row  # the one prompt's prefill into its one-row cache
    decode = max(fill, batch * per_token + batch * m.vocab * 4)
    activations = {"prefill": prefill, "decode": decode, None: max(prefill, decode)}[phase]
    return {"weights": weights, "kv_cache": kv, "activations": activations, "total": weights + kv + activations}


__all__ = ["WholeModel", "Published", "models", "get_model", "config_for", "build_model", "param_counts",
           "extrapolation_scale", "forward_flops", "memory_bytes", "kv_bytes_per_token", "tiny"]
