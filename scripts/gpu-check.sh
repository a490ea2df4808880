#!/usr/bin/env bash
# The project's GPU check for a lent machine (python3 with a CUDA torch, no network), in about 5 minutes.
#
#   bash scripts/gpu-check.sh        # from the repo root, with .whl/ (zeus and its deps) next to it
#
# Steps, each under its own timeout and all under one overall budget (GPU_CHECK_BUDGET_S, default 580 s);
# a step that fails or times out does not stop the next one:
#   install   the local wheels into /tmp/site (no index, no deps: the machine's own torch is kept)
#   meters    which energy meters work here and what --meter auto picks
#   selfcheck every MoE strategy's output on the GPU (fp32, bf16), 10 s energy windows, idle, trace vs counter
#   small     bench-strategies --preset small in bfloat16
#   xl        bench-strategies --preset xl in bfloat16, batch 128
#   odd       bench-strategies --hidden 250 in bfloat16: grouped's zero-padded grouped_mm for a width the 16-byte
#             rule refuses; grouped_fm's row says why it cannot run
#   llm       run --arch qwen3-30b-a3b (one LLM MoE layer, both dense SwiGLU FFNs) at 1, 64 and 4096 tokens in
#             bfloat16: the GPU build of MoELayer, every strategy under auto (its probe prunes losers), the
#             on-device expert-load counter; --max-forward-s calibrates the GPU's roofline once and skips nothing
#   whole     run --model qwen3-30b-a3b --vs qwen3-32b on their first 2 layers, batch 1 and 16, context 512, in
#             bfloat16 with moe-energy's layer in the MoE blocks: whole models' prefill and decode windows, the static
#             KV cache on the GPU (needs transformers, from .whl/ or the machine; else the step fails and says so)
#   int8      run --arch olmoe-1b-7b --weights int8 at 1 and 64 tokens: int8 weights dequantized for the GPU GEMMs
#             (no int8 kernel of its own there yet), their output error against bf16 in each record
#   w8a8      the same with --weights w8a8: each row rounded to int8 too (on the GPU the rounding is applied and the
#             weight dequantized: no int8 kernel there yet), and the w8a8 roofline rate calibrated on first use
#   fp8       run --arch olmoe-1b-7b --weights fp8 at 1, 64 and 4096 tokens: e4m3 weights and rows through
#             torch._scaled_mm (the shared experts, dense FFNs) and torch._scaled_grouped_mm (the routed experts; Hopper),
#             never run on a GPU before: compare its tokens/s with the llm step's bf16 rows and its output error
#             (~2-4 %) with the int8 step's
#   caps      run --preset small at two GPU power caps (the maximum and half of it), with carbon and cost:
#             set through NVML, read back per window, restored at the end (nvidia-smi's limit is logged after)
#   llmcaps   run --arch qwen3-30b-a3b --tokens 64 at the same two caps
#   ep        run --arch olmoe-1b-7b --parallel expert on one NCCL rank (torchrun): the LLM-layer EP path
#   peers     bench-strategies --arch qwen3-30b-a3b at 1, 64 and 4096 tokens in bfloat16: every strategy vs both
#             dense FFNs and transformers' own block (only if transformers is in .whl/: else its rows say why)
#   vllm      run --model qwen3-30b-a3b --vs qwen3-32b --engine vllm at batch 1, 64 and 256, context 512: whole models
#             through vLLM (dummy weights, its own batching), the decode J/token ratio at batch 64 printed beside
#             ML.ENERGY's published 3.56x. Last, since installing the vllm extra may replace the machine's torch;
#             "not run" (not a failure) when vLLM neither imports nor installs (no network). Two engine starts and
#             12 points take minutes: run it alone, GPU_CHECK_ONLY="install vllm", to give it the whole budget.
#             Then (in the same step group) sweep --engine transformers,vllm --dry-run: the engine axis's points and
#             its refusals on a host that really has vLLM and CUDA.
# GPU_CHECK_ONLY="name ..." runs only the named steps (the others are not run, nor listed).
# Results (JSON, and this script's log) go to $OUT, or ./gpu-check-out when $OUT is unset.
# Exit code: 0 only if every step passed.
set -u

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: >"$LOG"
BUDGET="${GPU_CHECK_BUDGET_S:-580}"
START=$(date +%s)
DEVICE="${GPU_CHECK_DEVICE:-cuda}"  # cpu only to try this script itself on a host without a GPU
export MOE_ENERGY_CACHE_DIR=/tmp/moe-energy-cache  # the roofline is calibrated once, reused by the 2nd bench

NAMES=()
RESULTS=()
SECONDS_TAKEN=()

ONLY="${GPU_CHECK_ONLY:-}"

# chosen NAME: whether GPU_CHECK_ONLY (when set) names this step (vllmsweep goes with vllm: it needs vLLM installed).
chosen() {
  local name=$1
  [[ $name == vllmsweep ]] && name=vllm
  [[ -z $ONLY || " $ONLY " == *" $name "* ]]
}

# skip NAME WHY [RESULT]: record a step that did not run, and why: "skipped" (the budget: a problem) by default,
# "not run" for what this machine cannot offer (not a problem).
skip() {
  NAMES+=("$1"); RESULTS+=("${3:-skipped} ($2)"); SECONDS_TAKEN+=(0)
  echo "=== $1: ${3:-skipped}, $2" | tee -a "$LOG"
}

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget); record the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  chosen "$name" || return 0
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  if ((left < 15)); then
    skip "$name" "budget spent"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  local what="ok"
  if ((rc == 124 || rc == 137)); then what="TIMED OUT after ${limit}s"; elif ((rc != 0)); then what="FAILED (exit $rc)"; fi
  NAMES+=("$name"); RESULTS+=("$what"); SECONDS_TAKEN+=("$took")
}

INSTALL='if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no .whl/ here: using whatever zeus the machine has (carry .whl to test the pinned zeus)"; exit 0; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl'

export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu-check: $(date -u +%FT%TZ), out $OUT, budget ${BUDGET}s" | tee -a "$LOG"
timeout 15 nvidia-smi --query-gpu=name,driver_version,power.limit,temperature.gpu,clocks.sm --format=csv 2>&1 \
  | tee -a "$LOG"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

step install 60 bash -c "$INSTALL"
step meters 40 python3 -m moe_energy meters --device "$DEVICE"
step selfcheck 120 python3 -m moe_energy selfcheck --device "$DEVICE" --out "$OUT"
step small 70 python3 -m moe_energy bench-strategies --preset small --dtype bfloat16 --device "$DEVICE" --out "$OUT"
step xl 90 python3 -m moe_energy bench-strategies --preset xl --dtype bfloat16 --device "$DEVICE" --batch-size 128 \
  --out "$OUT"
step odd 40 python3 -m moe_energy bench-strategies --hidden 250 --dtype bfloat16 --device "$DEVICE" --seconds 0.5 \
  --out "$OUT"
step llm 100 python3 -m moe_energy run --arch qwen3-30b-a3b --tokens 1,64,4096 --dtype bfloat16 --device "$DEVICE" \
  --duration 3 --repeats 1 --idle-seconds 2 --cooldown 0 --max-forward-s 5 --out "$OUT"
step whole 90 python3 -m moe_energy run --model qwen3-30b-a3b --vs qwen3-32b --layers 2 --batch 1,16 --context 512 \
  --moe-impl moe-energy --dtype bfloat16 --device "$DEVICE" --duration 2 --repeats 1 --idle-seconds 1 --cooldown 0 \
  --out "$OUT"
step wholeimpls 60 python3 benchmarks/whole_moe_impls.py --model qwen3-30b-a3b --layers 2 --batch 1,16 \
  --dtype bfloat16 --device "$DEVICE" --seconds 5
step int8 60 python3 -m moe_energy run --arch olmoe-1b-7b --tokens 1,64 --weights int8 --dtype bfloat16 \
  --device "$DEVICE" --duration 2 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$OUT"
step w8a8 45 python3 -m moe_energy run --arch olmoe-1b-7b --tokens 1,64 --weights w8a8 --dtype bfloat16 \
  --device "$DEVICE" --duration 2 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$OUT"
step fp8 60 python3 -m moe_energy run --arch olmoe-1b-7b --tokens 1,64,4096 --weights fp8 --dtype bfloat16 \
  --device "$DEVICE" --duration 2 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$OUT"
MAXW=$(timeout 15 nvidia-smi --query-gpu=power.max_limit --format=csv,noheader,nounits 2>/dev/null | head -1 | cut -d. -f1)
CAPS="${MAXW:-700},$(( ${MAXW:-700} / 2 ))"
step caps 90 python3 -m moe_energy run --preset small --epochs 1 --power-limit "$CAPS" --carbon-intensity 400 \
  --price-per-kwh 0.15 --device "$DEVICE" --duration 3 --repeats 1 --idle-seconds 2 --cooldown 0 --out "$OUT"
timeout 15 nvidia-smi --query-gpu=power.limit,power.default_limit --format=csv 2>&1 | tee -a "$LOG"  # restored?
step llmcaps 90 python3 -m moe_energy run --arch qwen3-30b-a3b --tokens 64 --dtype bfloat16 --power-limit "$CAPS" \
  --device "$DEVICE" --duration 3 --repeats 1 --idle-seconds 2 --cooldown 0 --out "$OUT"
step ep 90 python3 -m torch.distributed.run --nproc-per-node 1 -m moe_energy run --parallel expert \
  --arch olmoe-1b-7b --tokens 1,64 --dtype bfloat16 --duration 2 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$OUT"
step peers 100 python3 -m moe_energy bench-strategies --arch qwen3-30b-a3b --tokens 1,64,4096 --dtype bfloat16 \
  --device "$DEVICE" --seconds 1 --out "$OUT"
# vLLM: imported, or its extra installed within what is left of the budget (at most 180 s); else skipped cleanly.
VLLM_LEFT=$((BUDGET - ($(date +%s) - START) - 60))
if chosen vllm && ((VLLM_LEFT > 60)); then
  if timeout 30 python3 -c "import vllm" >>"$LOG" 2>&1 \
    || timeout $((VLLM_LEFT < 180 ? VLLM_LEFT : 180)) python3 -m pip install -q -e ".[vllm]" >>"$LOG" 2>&1; then
    step vllm 480 python3 -m moe_energy run --model qwen3-30b-a3b --vs qwen3-32b --engine vllm --batch 1,64,256 \
      --context 512 --device "$DEVICE" --duration 5 --warmup 2 --repeats 1 --idle-seconds 2 --cooldown 0 --out "$OUT"
    step vllmsweep 60 python3 -m moe_energy sweep --model qwen3-30b-a3b --vs qwen3-32b --engine transformers,vllm \
      --batch 1,64 --context 512 --device "$DEVICE" --dry-run --db "$OUT/vllm-sweep.db"
  else
    skip vllm "vLLM does not import, pip install -e '.[vllm]' failed: no network?" "not run"
  fi
elif chosen vllm; then
  skip vllm "budget spent"
fi

echo
echo "=== summary ($(($(date +%s) - START)) s of ${BUDGET}s)" | tee -a "$LOG"
status=0
for i in "${!NAMES[@]}"; do
  printf '  %-10s %-28s %4ss\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" | tee -a "$LOG"
  [[ ${RESULTS[$i]} == ok || ${RESULTS[$i]} == "not run"* ]] || status=1
done
python3 - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for f in sorted(out.glob("selfcheck-*.json")):
    doc = json.loads(f.read_text())
    print(f"  selfcheck ({f.name}): {doc['verdict']}")
    for c in doc["checks"]:
        if c["status"] == "FAIL" or c["group"] == "energy" or c["name"] == "auto meter":
            print(f"    {c['status']:<4} {c['name']}: {c['detail']}")
for f in sorted(out.glob("run-*.json")):
    doc = json.loads(f.read_text())
    print(f"  {f.name}: {(doc.get('arch') or {}).get('name')}, {doc['options']['dtype']}, "
          f"weights {doc['options'].get('weights')}")
    for cap in doc.get("power_limits") or []:
        print(f"    cap {cap}")
    for m in doc["models"]:
        rate = m.get("tokens_per_second") or m.get("inferences_per_second") or 0
        per_j = m.get("tokens_per_joule") or m.get("inferences_per_joule") or 0
        print(f"    {m['name']:<28} {rate:>14,.0f} /s {per_j:>10,.1f} /J ({m.get('energy_method')}) "
              f"experts touched {m.get('experts_touched')}, cap read back {m.get('power_limit_w')} W, "
              f"{m.get('co2e_g_per_million')} g CO2e/1M, int8 error {m.get('weights_output_error')}")
for f in sorted(out.glob("run-*.json")):
    doc = json.loads(f.read_text())
    if doc.get("engine") != "vllm":
        continue
    per = {(m.get("model"), m.get("phase"), m.get("batch")): m.get("joules_per_token") for m in doc["models"]}
    for b in sorted({m.get("batch") for m in doc["models"]}):
        moe, dense = per.get(("qwen3-30b-a3b", "decode", b)), per.get(("qwen3-32b", "decode", b))
        if moe and dense:
            print(f"  vLLM decode B={b}: qwen3-30b-a3b {moe:.4g} J/token, qwen3-32b {dense:.4g} J/token: MoE/dense "
                  f"{moe / dense:.3f} (dense/MoE {dense / moe:.2f}x)" + ("; ML.ENERGY published 3.56x (dense/MoE) "
                                                                         "at batch 64" if b == 64 else ""))
        else:
            print(f"  vLLM decode B={b}: no J/token for both models (skipped or unmetered; see the JSON)")
for f in sorted(out.glob("strategies-*.json")):
    doc = json.loads(f.read_text())
    o = doc["options"]
    if "ms_per_forward" in (doc["rows"][0] if doc.get("rows") else {}):  # an LLM layer vs transformers
        print(f"  {f.name}: {doc['environment'].get('device_name')}, {o['dtype']}")
        for r in doc["rows"]:
            sp = r.get("speedup_vs_transformers")
            print(f"    T={r['tokens']:<5} {r['name']:<28} {r['ms_per_forward']:9.3f} ms/forward"
                  + (f"  {sp:6.2f}x vs transformers' fastest" if sp else ""))
        continue
    print(f"  {f.name}: {doc['environment'].get('device_name')}, {o['dtype']}, batch {o['batch_size']}")
    for r in doc["rows"]:
        sp = r.get("speedup_vs_active_loop")
        if r.get("not_timed"):
            print(f"    {r['name']:<24} not timed: {r['not_timed']}")
            continue
        print(f"    {r['name']:<24} {r['ms_per_batch']:9.3f} ms/batch {r['inferences_per_second']:>14,.0f} inf/s"
              + (f"  {sp:6.2f}x vs active_loop" if sp else ""))
PY
echo "gpu-check: $([[ $status == 0 ]] && echo OK || echo 'PROBLEMS (see above)')" | tee -a "$LOG"
exit $status
