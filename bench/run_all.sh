#!/usr/bin/env bash
# Reproduce every CPU number in bench/RESULTS.md (each script rewrites its own section).
#   bash bench/run_all.sh            from the repository root (uses .venv when present)
# The GPU section comes from bench/gpu_check.sh, run on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
for b in step_overhead frozen_prefix feature_cache distillation data_loading memory_prediction; do
  echo "== bench/$b.py"
  start=$(date +%s)
  "$PY" "bench/$b.py"
  echo "== bench/$b.py: $(( $(date +%s) - start )) s"
done
echo "== smoke test of the GPU check on CPU (tiny models; not written to RESULTS.md)"
"$PY" bench/gpu_check.py --tiny --steps 2 --warmup 1 --no-write > /dev/null
echo "== safe info's predicted peaks for the real-size GPU check (CPU, no weights)"
"$PY" bench/gpu_check.py --predict-only
echo "done: bench/RESULTS.md"
