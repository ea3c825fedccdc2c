"""The benchmarks drive the Trainer's internals (and stand in for some of them): run the two that patch it
most, with one repetition and without writing bench/RESULTS.md, so a change to those internals that breaks
a benchmark fails here rather than at the next `bash bench/run_all.sh`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,expect", [
    ("step_overhead.py", ["--reps", "1", "--warmup", "1", "--sweep"], "Target SAFE step / bare step"),
    ("distillation.py", ["--reps", "1", "--warmup", "1"], "the teacher adds no copy of the base weights"),
    # the lent GPU's script, on tiny models: a GPU session must not find it broken
    ("gpu_check.py", ["--tiny", "--steps", "1", "--warmup", "1"], "vs the bare transformers step on the same batch"),
])
def test_benchmark_runs_end_to_end(script, args, expect):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--no-write"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
    if script == "step_overhead.py":  # both sides ran the same batch: SAFE's loss (eval mode) is the bare model's
        m = re.search(r"loss SAFE (\d+\.\d+) vs bare (\d+\.\d+)", proc.stdout)
        assert m and abs(float(m[1]) - float(m[2])) < 1e-3, m and m.group(0)
