#!/usr/bin/env bash
# The project's GPU check for a lent machine (python3 with a CUDA torch, no network), in about 7 minutes.
#
#   bash scripts/gpu-wheels.sh       # once, on a host with network: zeus and transformers, pinned, into .whl/
#   bash scripts/gpu-check.sh        # from the repo root on the GPU machine, with .whl/ carried (it is git-ignored)
#   GPU_CHECK_DRY=1 bash scripts/gpu-check.sh   # on any CPU host, ~3 minutes: every step's command, tiny, on the CPU
#
# Steps, each under its own timeout and all under one overall budget (GPU_CHECK_BUDGET_S, default 420 s, so that a
# session's 15 minutes of device time hold the machine's start, this run and a rerun of what failed);
# a step that fails or times out does not stop the next one:
#   install   the local wheels into /tmp/site (no index, no deps: the machine's own torch is kept); always run
#   meters    which energy meters work here and what --meter auto picks
#   selfcheck every MoE strategy's output on the GPU (fp32, bf16), 5 s energy windows, idle, trace vs counter
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
#   wholeimpls benchmarks/whole_moe_impls.py on the same 2 layers: moe-energy's MoE blocks against transformers'
#             eager, batched_mm and grouped_mm experts, decode at batch 1 and 16 (printed to the log)
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
#   ep        torchrun --standalone, run --arch olmoe-1b-7b --parallel expert --device cuda on one NCCL rank: the
#             LLM-layer EP path
#   peers     bench-strategies --arch qwen3-30b-a3b at 1, 64 and 4096 tokens in bfloat16: every strategy vs both
#             dense FFNs and transformers' own block (only if transformers is in .whl/: else its rows say why)
#   vllm      run --model qwen3-30b-a3b --vs qwen3-32b --engine vllm at batch 1, 64 and 256, context 512: whole models
#             through vLLM (dummy weights, its own batching), the decode J/token ratio at batch 64 printed beside
#             ML.ENERGY's published 3.56x; then (in the same step group, as vllmsweep) sweep --engine
#             transformers,vllm --dry-run: the engine axis's points and its refusals on a host that really has vLLM
#             and CUDA. Only where vLLM imports: the lent machines have none, and it cannot travel as wheels (its
#             wheel and its own torch are far over the 64 MiB a call carries), so there it is "not run" (not a
#             failure). GPU_CHECK_VLLM_INSTALL=1 tries pip install -e '.[vllm]' first (needs network; may replace
#             the machine's torch, hence last). Two engine starts and 12 points take minutes: run it alone,
#             GPU_CHECK_ONLY=vllm GPU_CHECK_BUDGET_S=580.
# GPU_CHECK_ONLY="name ..." runs only the named steps, and install (the others are not run, nor listed); a name that
# is not a step stops the script at once (exit 2) before it spends any device time.
# GPU_CHECK_DRY=1: every chosen step's command on this host's CPU (--device cpu), with tiny shapes and windows
# appended (later flags win), to show that each flag and value is still accepted in seconds, without a GPU; a step
# the CPU refuses for a GPU-only reason (fp8, power caps, vLLM) passes when its refusal is that reason. Each step's
# timeout there is 4 x its GPU one (a busy CPU host is slow, not broken), under a 900 s budget.
# Output: $OUT (./gpu-check-out when unset) gets two files: gpu-check.log (every step's output and the summary) and
# results.tar (every step's JSON and the sweep's database, updated after each step, so a run cut short keeps what it
# finished; the device tool returns at most 8 files from $OUT). The JSON files themselves are written to
# GPU_CHECK_RESULTS (default: a new folder under /tmp).
# Exit code: 0 only if every step passed and the summary could read every result; 2 for a bad GPU_CHECK_ONLY.
set -u

STEPS="install meters selfcheck small xl odd llm whole wholeimpls int8 w8a8 fp8 caps llmcaps ep peers vllm"
ONLY="${GPU_CHECK_ONLY:-}"
for n in $ONLY; do
  if [[ " $STEPS " != *" $n "* ]]; then
    echo "gpu-check: GPU_CHECK_ONLY names '$n', which is no step; the steps: $STEPS" >&2
    exit 2
  fi
done

DRY="${GPU_CHECK_DRY:-0}"
[[ $DRY == 0 ]] && DRY=
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: >"$LOG"
RES="${GPU_CHECK_RESULTS:-$(mktemp -d /tmp/gpu-check-results.XXXXXX)}"
mkdir -p "$RES"
TMP=$(mktemp -d /tmp/gpu-check-tmp.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
START=$(date +%s)
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SITE=/tmp/site
if [[ -n $DRY ]]; then
  DEVICE=cpu
  SITE="$TMP/site"  # the wheels still install (for the GPU machine's Python 3.12), but are not imported here
  BUDGET="${GPU_CHECK_BUDGET_S:-900}"
fi
DRY_LIMIT_SCALE=4
# the roofline is calibrated once, reused by the later steps
export MOE_ENERGY_CACHE_DIR="${MOE_ENERGY_CACHE_DIR:-/tmp/moe-energy-cache}"

# GPU_CHECK_DRY: what each step appends on the CPU (tiny shapes, short windows: later flags override earlier ones),
# and the refusal that is a pass there (a GPU-only feature, refused on a CPU for the right reason).
# float32: a CPU without native bf16 emulates it, and its first bf16 roofline calibration alone takes ~35 s
F32="--dtype float32"
LAYER_TINY="--tokens 1 --d-model 64 --ffn-dim 32 --experts 8 --duration 0.2 --warmup 0 --idle-seconds 0 $F32"
# one strategy: every flag is still parsed and checked, without timing (and compiling) all of them (12 -> 5 s a step)
BENCH_TINY="--seconds 0.05 --batch-size 8 --experts 4 --top-k 2 --layers 1 --input-dim 32 --moe-strategy grouped $F32"
declare -A TINY=(
  [install]="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64"
  [selfcheck]="--seconds 1 --idle-seconds 0"
  [small]="$BENCH_TINY --hidden 32" [xl]="$BENCH_TINY --hidden 32" [odd]="$BENCH_TINY"
  [llm]="$LAYER_TINY" [int8]="$LAYER_TINY" [w8a8]="$LAYER_TINY" [fp8]="$LAYER_TINY" [llmcaps]="$LAYER_TINY"
  [ep]="$LAYER_TINY" [peers]="--tokens 1 --d-model 64 --ffn-dim 32 --experts 8 --seconds 0.05 --moe-strategy grouped $F32"
  [whole]="--tiny --batch 1 --duration 0.2 --warmup 0 --idle-seconds 0 $F32"
  [wholeimpls]="--tiny --batch 1 --seconds 0.2 $F32"
  [caps]="--samples 256 --hidden 32 --duration 0.2 --warmup 0 --idle-seconds 0"
)
declare -A CPU_REFUSAL=(
  [fp8]="--weights fp8: fp8 weights run on CUDA GPUs"
  [caps]="--power-limit: no GPU to cap" [llmcaps]="--power-limit: no GPU to cap"
  [vllm]="--engine vllm: vLLM is not installed here" [vllmsweep]="--engine vllm: vLLM is not installed here"
)
# what no refusal may say: the script itself is stale (a flag, a value, a file or a module that is gone)
STALE="unrecognized arguments|invalid choice|expected one argument|No such file|can't open file|No module named|Traceback"

NAMES=()
RESULTS=()
SECONDS_TAKEN=()

# chosen NAME: whether GPU_CHECK_ONLY (when set) names this step (vllmsweep goes with vllm: it needs vLLM installed;
# install always runs: every later step's meter needs the zeus it brings).
chosen() {
  local name=$1
  [[ $name == vllmsweep ]] && name=vllm
  [[ -z $ONLY || $name == install || " $ONLY " == *" $name "* ]]
}

# skip NAME WHY [RESULT]: record a step that did not run, and why: "skipped" (the budget: a problem) by default,
# "not run" for what this machine cannot offer (not a problem).
skip() {
  NAMES+=("$1"); RESULTS+=("${3:-skipped} ($2)"); SECONDS_TAKEN+=(0)
  echo "=== $1: ${3:-skipped}, $2" | tee -a "$LOG"
}

# bundle: every result so far into $OUT/results.tar (one file: the device tool returns at most 8 from $OUT).
bundle() {
  tar -cf "$OUT/results.tar.part" -C "$RES" . 2>>"$LOG" && mv -f "$OUT/results.tar.part" "$OUT/results.tar"
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
  # the limits are a GPU machine's; a dry run on a busy CPU host (the imports alone took 25 s on a loaded 2-core
  # one) gets DRY_LIMIT_SCALE times each, its budget still the bound: it checks flags, not speed
  [[ -n $DRY ]] && limit=$((limit * DRY_LIMIT_SCALE))
  ((limit > left)) && limit=$left
  if [[ -n $DRY ]]; then
    # shellcheck disable=SC2206  # the tiny flags are words, split on purpose
    local tiny=(${TINY[$name]:-})
    set -- "$@" "${tiny[@]}"
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$TMP/step.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  local what="ok"
  if ((rc == 124 || rc == 137)); then
    what="TIMED OUT after ${limit}s"
  elif ((rc != 0)); then
    what="FAILED (exit $rc)"
    local refusal=${CPU_REFUSAL[$name]:-}
    if [[ -n $DRY && -n $refusal ]] && grep -qF -- "$refusal" "$TMP/step.log" && ! grep -qE "$STALE" "$TMP/step.log"
    then
      what="ok (refused on cpu, as expected)"
    fi
  fi
  NAMES+=("$name"); RESULTS+=("$what"); SECONDS_TAKEN+=("$took")
  bundle
}

# shellcheck disable=SC2016  # "$1" expands in the bash -c that runs it
INSTALL='if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no .whl/ here: using whatever zeus and transformers the machine has (carry .whl, made by scripts/gpu-wheels.sh)"
  exit 0; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}" .whl/*.whl'

PP="$SITE:"
[[ -n $DRY ]] && PP=  # this host's Python need not be the GPU machine's 3.12: its own packages serve
export PYTHONPATH="$PP$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves what it printed in the log

echo "gpu-check: $(date -u +%FT%TZ), out $OUT, results $RES, budget ${BUDGET}s${DRY:+, DRY on the cpu}" | tee -a "$LOG"
if [[ -z $DRY ]]; then
  timeout 15 nvidia-smi --query-gpu=name,driver_version,power.limit,temperature.gpu,clocks.sm --format=csv 2>&1 \
    | tee -a "$LOG"
fi
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

step install 60 bash -c "$INSTALL" install "$SITE"
step meters 40 python3 -m moe_energy meters --device "$DEVICE"
step selfcheck 90 python3 -m moe_energy selfcheck --device "$DEVICE" --seconds 5 --out "$RES"
step small 60 python3 -m moe_energy bench-strategies --preset small --dtype bfloat16 --device "$DEVICE" --out "$RES"
step xl 60 python3 -m moe_energy bench-strategies --preset xl --dtype bfloat16 --device "$DEVICE" --batch-size 128 \
  --out "$RES"
step odd 40 python3 -m moe_energy bench-strategies --hidden 250 --dtype bfloat16 --device "$DEVICE" --seconds 0.5 \
  --out "$RES"
step llm 90 python3 -m moe_energy run --arch qwen3-30b-a3b --tokens 1,64,4096 --dtype bfloat16 --device "$DEVICE" \
  --duration 3 --warmup 0.5 --repeats 1 --idle-seconds 2 --cooldown 0 --max-forward-s 5 --out "$RES"
step whole 90 python3 -m moe_energy run --model qwen3-30b-a3b --vs qwen3-32b --layers 2 --batch 1,16 --context 512 \
  --moe-impl moe-energy --dtype bfloat16 --device "$DEVICE" --duration 2 --warmup 0.5 --repeats 1 --idle-seconds 1 \
  --cooldown 0 --out "$RES"
step wholeimpls 60 python3 benchmarks/whole_moe_impls.py --model qwen3-30b-a3b --layers 2 --batch 1,16 \
  --dtype bfloat16 --device "$DEVICE" --seconds 5
step int8 60 python3 -m moe_energy run --arch olmoe-1b-7b --tokens 1,64 --weights int8 --dtype bfloat16 \
  --device "$DEVICE" --duration 2 --warmup 0.5 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$RES"
step w8a8 45 python3 -m moe_energy run --arch olmoe-1b-7b --tokens 1,64 --weights w8a8 --dtype bfloat16 \
  --device "$DEVICE" --duration 2 --warmup 0.5 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$RES"
step fp8 60 python3 -m moe_energy run --arch olmoe-1b-7b --tokens 1,64,4096 --weights fp8 --dtype bfloat16 \
  --device "$DEVICE" --duration 2 --warmup 0.5 --repeats 1 --idle-seconds 1 --cooldown 0 --out "$RES"
MAXW=
[[ -z $DRY ]] && MAXW=$(timeout 15 nvidia-smi --query-gpu=power.max_limit --format=csv,noheader,nounits 2>/dev/null \
  | head -1 | cut -d. -f1)
[[ $MAXW =~ ^[0-9]+$ ]] || MAXW=700
CAPS="$MAXW,$((MAXW / 2))"
step caps 75 python3 -m moe_energy run --preset small --epochs 1 --power-limit "$CAPS" --carbon-intensity 400 \
  --price-per-kwh 0.15 --device "$DEVICE" --duration 3 --warmup 0.5 --repeats 1 --idle-seconds 2 --cooldown 0 \
  --out "$RES"
if chosen caps && [[ -z $DRY ]]; then  # restored?
  timeout 15 nvidia-smi --query-gpu=power.limit,power.default_limit --format=csv 2>&1 | tee -a "$LOG"
fi
step llmcaps 60 python3 -m moe_energy run --arch qwen3-30b-a3b --tokens 64 --dtype bfloat16 --power-limit "$CAPS" \
  --device "$DEVICE" --duration 3 --warmup 0.5 --repeats 1 --idle-seconds 2 --cooldown 0 --out "$RES"
step ep 75 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m moe_energy run --parallel expert \
  --arch olmoe-1b-7b --tokens 1,64 --dtype bfloat16 --device "$DEVICE" --duration 2 --warmup 0.5 --repeats 1 \
  --idle-seconds 1 --cooldown 0 --out "$RES"
step peers 60 python3 -m moe_energy bench-strategies --arch qwen3-30b-a3b --tokens 1,64,4096 --dtype bfloat16 \
  --device "$DEVICE" --seconds 1 --out "$RES"
# vLLM: only where it imports (or, with GPU_CHECK_VLLM_INSTALL=1, installs); else "not run", at no cost. The dry
# run tries both commands on the CPU, where each must be refused for want of vLLM, not for a stale flag.
vllm_here() {
  [[ -n $DRY ]] && return 0
  timeout 60 python3 -c "import vllm" >>"$LOG" 2>&1 && return 0
  [[ ${GPU_CHECK_VLLM_INSTALL:-0} == 1 ]] || return 1
  local left=$((BUDGET - ($(date +%s) - START) - 60))
  ((left > 60)) && timeout $((left < 180 ? left : 180)) python3 -m pip install -q --retries 0 --timeout 10 \
    -e ".[vllm]" >>"$LOG" 2>&1
}
if chosen vllm; then
  if vllm_here; then
    step vllm 480 python3 -m moe_energy run --model qwen3-30b-a3b --vs qwen3-32b --engine vllm --batch 1,64,256 \
      --context 512 --device "$DEVICE" --duration 5 --warmup 2 --repeats 1 --idle-seconds 2 --cooldown 0 --out "$RES"
    step vllmsweep 60 python3 -m moe_energy sweep --model qwen3-30b-a3b --vs qwen3-32b --engine transformers,vllm \
      --batch 1,64 --context 512 --device "$DEVICE" --dry-run --db "$RES/vllm-sweep.db"
  else
    skip vllm "vLLM does not import here (GPU_CHECK_VLLM_INSTALL=1 tries pip install -e '.[vllm]')" "not run"
  fi
fi

echo
echo "=== summary ($(($(date +%s) - START)) s of ${BUDGET}s)" | tee -a "$LOG"
status=0
for i in "${!NAMES[@]}"; do
  printf '  %-10s %-28s %4ss\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" | tee -a "$LOG"
  [[ ${RESULTS[$i]} == ok* || ${RESULTS[$i]} == "not run"* ]] || status=1
done
python3 - "$RES" <<'PY' 2>&1 | tee -a "$LOG"
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
if ((PIPESTATUS[0] != 0)); then
  echo "gpu-check: the summary could not read the results (the JSON's keys have changed?)" | tee -a "$LOG"
  status=1
fi
bundle
echo "gpu-check: $([[ $status == 0 ]] && echo OK || echo 'PROBLEMS (see above)'); results in $OUT/results.tar" \
  | tee -a "$LOG"
exit $status
