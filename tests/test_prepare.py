"""prepare(): cast, layout and strategy picked by measurement, compile timed apart; dense and MoE alike."""

from __future__ import annotations

import pytest
import torch

from moe_energy.config import ConfigError
from moe_energy.models import DenseMLP, MoE
from moe_energy.runner.prepare import compile_candidates, prepare


def tiny_moe(strategy: str) -> MoE:
    torch.manual_seed(0)
    return MoE(4, 16, 2, 2, input_dim=12, classes=4, strategy=strategy)


def test_prepare_auto_moe_picks_layout_and_strategy_and_records_them():
    m = tiny_moe("auto")
    x = torch.randn(16, 12)
    ref = m(x).detach()
    fast, info = prepare(m, dtype="float32", compile=False, device="cpu", example=x)
    assert fast is m and not m.training
    assert info["weight_layout"] in ("out_in", "in_out") and m.layout == info["weight_layout"]
    assert set(info["layout_probe_ms"]) == {"out_in", "in_out"}
    assert info["layout_probe_ms"][info["weight_layout"]] == min(info["layout_probe_ms"].values())
    assert info["strategy"] == "auto" and info["resolved_strategy"] in info["auto_probe_ms"]
    assert info["compile"] is False and info["compile_s"] is None and info["prepare_s"] > 0
    assert m.strategy == "auto"  # eager: auto stays auto (cached choice per batch shape)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref)


def test_prepare_casts_dense_and_moe_alike():
    for model in (DenseMLP(12, 20, 2, 4), tiny_moe("padded")):
        fast, info = prepare(model, dtype="bfloat16", compile=False, device="cpu", layout="keep")
        assert info["dtype"] == "bfloat16"
        assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
        with torch.inference_mode():
            assert fast(torch.randn(3, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_prepare_rejects_unknown_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        prepare(DenseMLP(4, 4, 1, 2), dtype="int3", compile=False, device="cpu")


def test_fp32_compile_never_picks_grouped():
    assert "grouped" not in compile_candidates(torch.float32)
    assert "grouped" in compile_candidates(torch.bfloat16)


@pytest.mark.slow
def test_compile_resolves_auto_and_matches_eager():
    m = tiny_moe("auto")
    x = torch.randn(16, 12)
    with torch.inference_mode():
        ref = m(x)
    fast, info = prepare(m, dtype="float32", compile=True, device="cpu", example=x, layout="keep")
    assert info["compile"] is True and info["compile_mode"] == "default" and info["compile_s"] > 0
    assert info["resolved_strategy"] != "grouped" and m.strategy == info["resolved_strategy"]
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref)


def test_best_ms_is_the_least_of_reps_synced_forwards_after_one_untimed():
    from moe_energy.runner.prepare import best_ms

    seen = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return x

    assert best_ms(Counting(), torch.zeros(2, 2), reps=4) >= 0
    assert len(seen) == 1 + 4 and all(seen)
