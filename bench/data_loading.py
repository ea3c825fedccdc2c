"""Q4: can the loader keep up with the step? Samples/s of the loader alone vs the step's consumption.

Synthetic corpus (write_synthetic default sizes), demo models (random weights), phase 2 `fusion` (MUSIC-AVQA + VQA v2,
batch 16) with every slot audio-bearing (audio_ratio 1.0: the heaviest mix; the curriculum ends there).
For num_workers 0, 1, 2 and with / without the feature cache:

- loader alone: a fresh BatchStream over SAFEDataset (the trainer's own construction) pulling ``--batches``
  batches from the start of an epoch (worker start-up included: a new epoch starts new workers);
- step alone: ``Trainer._optimizer_step`` on an already collated batch (the step's consumption), timed
  in between the loader runs so that load on the machine hits both alike;
- end to end: ``_optimizer_step`` pulling from the BatchStream, as training runs.

    python bench/data_loading.py [--batches 4] [--reps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# write_synthetic's default sizes (smaller than the demo's), to keep the cache build short
SMALL = C.SMALL_CORPUS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    C.setup_threads()
    from safe_av.training.data import BatchStream, SAFEDataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    workers = [int(x) for x in args.workers.split(",")]
    results = {}
    step_rate = {}
    bs = None
    for cached in (False, True):
        cfg = C.demo_config(tmp / "data", *SMALL, feature_cache=(tmp / "cache") if cached else None)
        tr = C.make_trainer(cfg, tmp / f"run-{int(cached)}")
        phase = cfg.train.phases[1]
        optim, sched, stream0, _ = tr._start_phase(1)
        tr.ddp_model.train()
        w = tr._weights(phase)
        bs = phase.batch_size
        samples = stream0.dataset.samples

        def new_stream(n_workers, epoch):
            ds = SAFEDataset(samples, sampling_rate=tr.processor.sampling_rate, max_seconds=cfg.data.max_audio_seconds,
                             augment=cfg.data.augment, seed=cfg.train.seed + 1, feature_cache=tr._feature_cache())
            st = BatchStream(ds, tr.processor.collate, batch_size=bs, dataset_weights=phase.datasets,
                             seed=cfg.train.seed + 1000, num_workers=n_workers)
            st.configure(1.0, None)
            st.epoch = epoch
            return st

        # step alone, on a collated batch
        batch = C.audio_batch(stream0, need_images=False)
        one_step = lambda: tr._optimizer_step(tr.ddp_model, optim, sched, C.FixedStream(batch), w)  # noqa: E731
        step_times = C.timed(one_step, warmup=2, reps=2)
        for n in workers:
            loader, e2e = [], []
            for rep in range(args.reps):
                st = new_stream(n, rep)
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    st.next()
                loader.append(time.perf_counter() - t0)
                st._iter = None  # ends the workers
                st = new_stream(n, 100 + rep)
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    tr._optimizer_step(tr.ddp_model, optim, sched, st, w)
                e2e.append(time.perf_counter() - t0)
                st._iter = None
                step_times += C.timed(one_step, warmup=0, reps=2)  # interleaved with the loader runs
            results[(cached, n)] = (args.batches * bs / C.median(loader), args.batches * bs / C.median(e2e))
        step_rate[cached] = bs / C.median(step_times)
        del tr

    rows = []
    for cached in (False, True):
        for n in workers:
            load, e2e = results[(cached, n)]
            s = step_rate[cached]
            serial = 1 / (1 / load + 1 / s)
            rows.append(["cache" if cached else "no cache", n, f"{load:.1f}", f"{s:.1f}", f"{load / s:.2f}",
                         f"{e2e:.1f}", f"{e2e / s:.2f}", f"{serial:.1f}"])
    body = [f"Synthetic corpus (write_synthetic default sizes), demo models (random weights), phase 2 `fusion`, batch {bs}, every row with audio. Loader and "
            f"end-to-end: median of {args.reps} runs of {args.batches} batches from a fresh epoch (worker start-up "
            "included); step alone: median of steps on one collated batch, interleaved with the loader runs.", "",
            C.md_table(["audio", "workers", "loader alone (samples/s)", "step alone (samples/s)",
                        "loader / step", "end to end (samples/s)", "end to end / step",
                        "serial bound 1/(1/L+1/S)"], rows), "",
            "Reading: loader / step > 1 means the loader alone outpaces the step; with num_workers 0 loading and "
            "stepping alternate, so end to end is near the serial bound. With workers, loading overlaps the step, "
            "but on this 2-core machine the workers and the step's threads share the same cores."]
    C.report("data_loading", "4. Data loading vs step consumption", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
