#!/usr/bin/env bash
# GPU check for a lent GPU (one H100; nothing downloadable there). Finishes in < 5 minutes.
#   bash bench/gpu_check.sh [gpu_check.py args]      e.g.  bash bench/gpu_check.sh --out "$OUT"
# Installs safe_av (editable, offline, no dependencies) only if it is not importable; never reaches the network.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
# a project venv only if its torch sees the GPU (the CPU venv copied from a laptop would not)
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: ERROR: torch is not importable with $PY (set PYTHON=/path/to/python with torch+CUDA)"; exit 2
fi
if ! "$PY" -c "import safe_av" 2>/dev/null; then
  echo "gpu_check: safe_av not importable; installing it from this checkout (offline, --no-deps)"
  if ! "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . 2>/tmp/gpu_check_pip.log; then
    echo "gpu_check: pip install -e . failed offline (see /tmp/gpu_check_pip.log); falling back to PYTHONPATH=src"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
missing=$("$PY" - <<'PY'
import importlib
mods = ["safe_av", "transformers", "accelerate", "safetensors", "tokenizers", "yaml", "numpy", "PIL", "scipy", "soundfile", "tqdm"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m} ({type(e).__name__}: {e})")
print("; ".join(bad))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: ERROR: not importable without the network: $missing"
  echo "gpu_check: install them from a local wheelhouse (pip install --no-index --find-links DIR ...) and rerun"
  exit 2
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
exec timeout 290 "$PY" bench/gpu_check.py "$@"
