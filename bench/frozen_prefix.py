"""Q1b: what does `model.frozen_prefix` save when many image tokens come before the audio?

SAFE's training step with the frozen prefix on (default) and off, same trainer, same batch, phase 2 (projector
+ fusion train; nothing in the base trains, so the prefix applies), distillation and retention off, for the
demo's tiny BLIP-2 OPT (8 query tokens before the audio) and a tiny LLaVA (64 patch tokens before the audio,
the layout of LLaVA-1.5's 576), both with random weights and the tiny CLAP. Interleaved repetitions (wall and
process CPU time) and the peak of torch's CPU allocations during one step (torch.profiler memory events).

    python bench/frozen_prefix.py [--reps 20] [--warmup 3] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASES = {"tiny-blip2-opt": "demo's tiny BLIP-2 OPT", "tiny-llava": "tiny LLaVA"}


def measure(base: str, args) -> dict:
    run = C.FusionPhaseStep("prefix", f"model.base={base}")
    batch = run.batch
    prefix = run.tr.model._frozen_prefix(run.tr.model.build_inputs(**batch))

    def step(on: bool):
        return lambda: run.step(frozen_prefix=on)

    cpu: dict = {}
    times = C.interleaved({"on": step(True), "off": step(False)}, warmup=args.warmup, reps=args.reps, cpu=cpu)
    peak = {k: C.tensor_peak_bytes(step(k == "on"))[0] for k in ("on", "off")}
    return {"base": base, "batch": int(batch["input_ids"].shape[0]), "seq": int(batch["input_ids"].shape[1]),
            "prefix": prefix, "wall": {k: C.median(v) for k, v in times.items()},
            "cpu": {k: C.median(v) for k, v in cpu.items()}, "peak": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    C.setup_threads()
    rows, res = [], []
    for base, label in BASES.items():
        r = measure(base, args)
        res.append(r)
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        rows.append([f"{label} (`{base}`)", f"{r['batch']} x {r['seq']}", f"{r['prefix']}",
                     ms(r["wall"]["off"]), ms(r["wall"]["on"]), f"{r['wall']['on'] / r['wall']['off']:.2f}",
                     f"{r['cpu']['on'] / r['cpu']['off']:.2f}", mib(r["peak"]["off"]), mib(r["peak"]["on"]),
                     f"{r['peak']['on'] / r['peak']['off']:.2f}"])
    body = ["Phase 2 (projector + fusion train, base frozen), one batch with image + audio in every row, distillation "
            f"and retention off, random weights; median of {args.reps} interleaved repetitions after {args.warmup} "
            "warm-up; peak = the largest sum of live torch CPU allocations during one step (weights excluded).", "",
            C.md_table(["base", "batch x seq", "prefix positions", "step, prefix off", "step, prefix on",
                        "wall on / off", "CPU on / off", "peak, off", "peak, on", "peak on / off"], rows), "",
            "The prefix runs without autograd in a second language-model call: "
            + "; ".join(f"with {r['prefix']} prefix positions of {r['seq']} ({r['base']}) the step takes "
                        f"x{r['wall']['on'] / r['wall']['off']:.2f} the time and x{r['peak']['on'] / r['peak']['off']:.2f} "
                        "the peak" for r in res)
            + ". The second call's fixed cost is what a short prefix does not repay; LLaVA-1.5's 576 of ~620 "
            "positions is the case it is for (`safe info`'s predictions: docs/memory.md)."]
    C.report("frozen_prefix", "1b. Frozen prefix: image tokens before the audio without autograd", body,
             write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
