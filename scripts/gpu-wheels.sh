#!/usr/bin/env bash
# The wheels scripts/gpu-check.sh installs on a lent GPU machine (Python 3.12, x86-64, no network), downloaded here
# into .whl/ (git-ignored: name it in the device call's carry):
#   zeus          the NVIDIA energy meter (pyproject's gpu extra pin); its NVIDIA path needs only nvidia-ml-py, httpx
#                 and numpy, which that machine has (pydantic, tyro and amdsmi are imported lazily, not by us)
#   transformers  the test extra's pin: the machine has an older 5.x, and the whole/wholeimpls/peers steps and
#                 the equivalence code use names of this release; its needs (huggingface-hub, tokenizers,
#                 safetensors, typer) are on the machine, regex too but perhaps older than it asks, so it travels
#   regex         see transformers
# About 13 MB in all. Usage, from the repo root: bash scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

pin() {  # pin NAME: NAME==VERSION as pyproject.toml pins it
  grep -o "\"$1==[^\"]*\"" pyproject.toml | head -1 | tr -d '"'
}
ZEUS=$(pin zeus)
TRANSFORMERS=$(pin transformers)
[[ -n $ZEUS && -n $TRANSFORMERS ]] || { echo "gpu-wheels: no zeus or transformers pin in pyproject.toml" >&2; exit 1; }

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$ZEUS" "$TRANSFORMERS" "regex>=2025.10.22"
ls -l .whl
du -sh .whl
