"""Q5: does `safe info`'s predicted peak training memory match what training uses?

For each phase of configs/demo.yaml (demo models, random weights, feature cache on as in the demo):
prediction = ``safe_av.info.model_summary(cfg, phase=i)`` "as configured" peak (weights + fp32 master +
grads + AdamW + activations + transient), at the default 32 text tokens and at the text length of the
measured batch. Measured, in a fresh child process per phase, running ``--steps`` optimizer steps of the
phase's own batches (its stream, real modality mix):

- RSS: peak ``VmHWM`` minus the RSS right after importing torch/transformers/safe_av (the brief's method;
  it also counts the data, tokenizer, Python objects and torch's runtime buffers);
- tensor bytes: resident parameters + buffers, plus the peak of torch's CPU allocations over the first
  steps (torch.profiler memory events; includes grads, AdamW states, activations, transients).

    python bench/memory_prediction.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.15


def child(args) -> int:
    import safe_av.info  # noqa: F401
    import safe_av.training.loop  # noqa: F401

    base_rss = C.current_rss_mib()
    cfg = C.demo_config(args.data, "data.synthetic=false", feature_cache=args.cache)
    tr = C.make_trainer(cfg, args.out)
    i = args.phase
    optim, sched, stream, _ = tr._start_phase(i)
    tr.ddp_model.train()
    w = tr._weights(cfg.train.phases[i])
    batches = [stream.next() for _ in range(args.steps)]
    weights = C.live_tensor_bytes(tr.model)

    def steps():
        for b in batches:
            tr._optimizer_step(tr.ddp_model, optim, sched, C.FixedStream(b), w)

    peak, _ = C.tensor_peak_bytes(steps)
    b = batches[0]
    L = int(b["input_ids"].shape[1])
    v = tr.model.base.num_image_tokens if bool(b["has_images"].any()) else 0
    k = tr.model.num_audio_tokens if bool(b["has_audio"].any()) else 0
    print(json.dumps({"phase": i, "rss_after_imports_mib": base_rss, "peak_rss_mib": C.peak_rss_mib(),
                      "weights_bytes": weights, "steps_peak_bytes": peak, "seq": L, "text_tokens": L - v - k,
                      "batch": int(b["input_ids"].shape[0]), "vocab": int(tr.model.base.vocab_size)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--phase", type=int)
    ap.add_argument("--data")
    ap.add_argument("--cache")
    ap.add_argument("--out")
    args = ap.parse_args()
    C.setup_threads()
    if args.child:
        return child(args)
    from safe_av.info import build_parts, model_summary

    tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    cfg = C.demo_config(tmp / "data", *C.SMALL_CORPUS, feature_cache=tmp / "cache")
    C.make_trainer(cfg, tmp / "prep")  # writes the corpus and builds the cache once
    parts = build_parts(cfg)
    rows = []
    worst = 0.0
    vocabs = set()
    for i, ph in enumerate(cfg.train.phases):
        m = C.run_child(Path(__file__), ["--child", "--phase", str(i), "--data", str(tmp / "data"),
                                         "--cache", str(tmp / "cache"), "--out", str(tmp / f"run-{i}"),
                                         "--steps", str(args.steps)])
        pred32 = model_summary(cfg, phase=i, parts=parts).memory
        pred = model_summary(cfg, phase=i, parts=parts, text_tokens=max(1, m["text_tokens"])).memory
        vocabs.add(m["vocab"])
        rss = (m["peak_rss_mib"] - m["rss_after_imports_mib"]) * 2**20
        tens = m["weights_bytes"] + m["steps_peak_bytes"]
        err = pred.peak / tens - 1
        worst = max(worst, abs(err))
        mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
        rows.append([f"{i + 1} `{ph.name}`", m["batch"], f"{m['seq']} ({m['text_tokens']} text)", mib(pred32.peak),
                     mib(pred.peak), f"{mib(pred.activations)} / {mib(pred.transient)}", mib(tens),
                     f"{err:+.0%}", f"{rss / 2**20:.0f}", f"{pred.peak / rss:.3f}"])
    body = ["Demo config (tiny BLIP-2 OPT + tiny CLAP, random weights, fp32, feature cache on), write_synthetic "
            f"default corpus; {args.steps} optimizer steps of each phase's own batches in a fresh process. "
            "All sizes in MiB.", "",
            C.md_table(["phase", "batch", "LM sequence", "predicted (32 text tok)", "predicted (batch's text tok)",
                        "pred. activations / transient", "measured tensor bytes", "prediction error",
                        "measured RSS delta", "predicted / RSS delta"], rows), "",
            f"Target: prediction within 15% of the measured peak: tensor-byte method "
            f"{C.verdict(worst <= TARGET)} (worst {worst:.0%}); RSS method **NOT met** - at demo size the "
            "prediction is a few MiB while the process grows by tens to hundreds of MiB that are not training "
            "tensors (torch/oneDNN runtime, data and tokenizer objects, allocator caching). The RSS comparison "
            "only becomes meaningful when tensors dominate, i.e. on the real models (bench/gpu_check.py compares "
            "torch.cuda.max_memory_allocated with the prediction there).", "",
            (f"LM vocabulary: `safe info` {parts.lm.vocab}, trained model {sorted(vocabs)} - they agree."
             if vocabs == {parts.lm.vocab} else
             f"LM vocabulary differs: `safe info` builds the tiny base without the corpus texts (vocab "
             f"{parts.lm.vocab}) while the trained model's tokenizer covers the corpus (vocab {sorted(vocabs)}), so "
             "the predicted logits memory (batch x sequence x vocab x 12 B) is off for the tiny presets.")]
    C.report("memory_prediction", "5. Memory prediction (`safe info`) vs measured", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
