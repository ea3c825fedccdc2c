"""The benchmarks drive the Trainer's internals (and stand in for some of them): run the two that patch it
most, with one repetition and without writing bench/RESULTS.md, so a change to those internals that breaks
a benchmark fails here rather than at the next `bash bench/run_all.sh`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,expect", [("step_overhead.py", "Target SAFE step / bare step"),
                                           ("distillation.py", "the teacher adds no copy of the base weights")])
def test_benchmark_runs_end_to_end(script, expect):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--reps", "1", "--warmup", "1",
                           "--no-write"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
