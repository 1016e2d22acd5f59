#!/usr/bin/env bash
# The one prepared GPU check (a lent GPU machine: no network, what it needs travels with the working tree).
#   bash bench/device_check.sh          # on the GPU machine: writes $OUT/device_check.json (or bench/results/)
#   bash bench/device_check.sh --cpu    # end to end on the CPU, small sizes: bench/results/device_check_cpu.json
# Parts: the device projection = CPU, its share of a ViT-B / ViT-L update, ZeRO-3 bf16 (and offload) at world size 1,
# and end to end on 1 GPU (bench/throughput.py: bare loop / trainer none / mars-pgm, ViT-B bf16 224 px; docs/throughput.md).
# At most 8 minutes (timeout 480 s). Wheels missing on the GPU machine (deepspeed, ...) may travel as a
# --target folder at .device_wheels/ (pip download --only-binary ... --python-version 3.12; install --no-deps
# --target .device_wheels); without deepspeed the ZeRO-3 part records that it was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .device_wheels ] && export PYTHONPATH="$PWD/.device_wheels:$PYTHONPATH"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$([ "${1:-}" = --cpu ] && echo cpu || echo cuda)}"
PY="${PYTHON:-python3}"
[ "${1:-}" = --cpu ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
name="device_check$([ "${1:-}" = --cpu ] && echo _cpu).json"
timeout 480 "$PY" bench/device_check.py --out "$out/$name" "$@"
echo "device_check: exit $? -> $out/$name"
