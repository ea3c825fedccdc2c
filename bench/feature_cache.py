"""Q2: how much faster is a phase-1 epoch with the frozen-feature cache (data.feature_cache)?

The synthetic corpus (``write_synthetic`` with its default sizes) in a temp folder; the demo models (random
weights); phase 1 of configs/demo.yaml (`projector_warmup`: AudioCaps, projector only, batch 16). One epoch =
``batches_per_epoch`` optimizer steps through the real BatchStream (loading, collation and the step), with
and without the cache, interleaved; both trainers are built from the same seed. The one-off cost of
building the cache (encoding every clip once) is timed too, giving the break-even number of epochs.

    python bench/feature_cache.py [--reps 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 3.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    C.setup_threads()
    from safe_av.data.cache import FeatureCache
    from safe_av.data.synthetic import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    write_synthetic(tmp / "data")  # default sizes
    runs = {}
    for name, cache in (("no cache", None), ("cache", tmp / "cache")):
        cfg = C.demo_config(tmp / "data", "data.synthetic=false", feature_cache=cache)
        tr = C.make_trainer(cfg, tmp / f"run-{name.replace(' ', '-')}")
        optim, sched, stream, _ = tr._start_phase(0)
        tr.ddp_model.train()
        w = tr._weights(cfg.train.phases[0])
        runs[name] = (tr, optim, sched, stream, w)
    tr_c = runs["cache"][0]
    n_batches = runs["cache"][3].batches_per_epoch()
    assert n_batches == runs["no cache"][3].batches_per_epoch()
    n_samples = len(runs["cache"][3].dataset)

    def epoch(name):
        tr, optim, sched, stream, w = runs[name]

        def run():
            for _ in range(n_batches):
                tr._optimizer_step(tr.ddp_model, optim, sched, stream, w)
        return run

    times = C.interleaved({k: epoch(k) for k in runs}, warmup=args.warmup, reps=args.reps)
    med = {k: C.median(v) for k, v in times.items()}
    speedup = med["no cache"] / med["cache"]

    # the one-off cost: encode every clip of the corpus into a fresh cache folder
    paths = tr_c.audio_paths()
    t = time.perf_counter()
    stats = FeatureCache.open(tmp / "cache-fresh", tr_c.model, max_seconds=tr_c.cfg.data.max_audio_seconds).build(
        tr_c.model, paths)
    build_s = time.perf_counter() - t
    saved = med["no cache"] - med["cache"]
    breakeven = build_s / saved if saved > 0 else float("inf")

    rows = [["no cache (audio loaded, resampled, CLAP features + frozen encoder every step)",
             f"{med['no cache']:.2f} s", f"{n_samples / med['no cache']:.1f}", "1.00"],
            ["feature cache (pooled encoder outputs read from safetensors)", f"{med['cache']:.2f} s",
             f"{n_samples / med['cache']:.1f}", f"**{speedup:.1f}x**"]]
    body = [f"Synthetic corpus at `write_synthetic` default sizes; phase 1 `{runs['cache'][0].cfg.train.phases[0].name}` "
            f"of configs/demo.yaml: {n_samples} AudioCaps training rows, {n_batches} batches of "
            f"{runs['cache'][0].cfg.train.phases[0].batch_size} per epoch, num_workers 0; demo models, random weights. "
            f"Median of {args.reps} interleaved epochs after {args.warmup} warm-up epoch each.", "",
            C.md_table(["epoch", "median time", "samples/s", "speed-up"], rows), "",
            f"Target >= {TARGET:.0f}x faster with the cache: {C.verdict(speedup >= TARGET)} (measured {speedup:.1f}x).",
            "",
            f"One-off cache build: {stats['new']} clips (train + selection + final-evaluation splits) encoded in {build_s:.2f} s; it pays for "
            f"itself after {breakeven:.1f} epochs of this phase."]
    C.report("feature_cache", "2. Feature cache: phase-1 epoch with vs without", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
