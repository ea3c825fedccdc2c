"""GPU check: real-size SAFE architectures with random weights - samples/s, peak memory vs `safe info`, MFU.

For ``blip2_opt_clap`` and ``llava_whisper`` (configs/<name>.yaml): the base VL model and the audio encoder
are built from the architecture files shipped in ``safe_av.presets`` (``load_arch`` -> ``from_config``, random
weights, bf16 on the GPU: BLIP-2's Q-Former and query tokens too, as ``from_pretrained(dtype=bf16)`` leaves them), with
a tiny word-level tokenizer (``build_tiny_tokenizer``) wrapped in the model's own processor class and
default-constructed image processors / feature extractors: nothing is downloaded. Training runs through the
real ``Trainer`` (a subclass overriding only ``_build_model``) on the synthetic corpus: one phase training
projector + fusion on MUSIC-AVQA batches whose every row has image + audio, distillation and retention on,
bf16 autocast, audio encoded on line (no feature cache), grad_accum 1.

Reported per model: step time (median of --steps after --warmup), samples/s, torch.cuda.max_memory_allocated
vs ``safe_av.info``'s predicted peak for the same setting, FLOPs per step (``safe_av.flops``) and MFU; then the
same batch with distillation off, with ``model.frozen_prefix`` off, and ``step_overhead.py``'s comparison at real
size: the SAFE step on precomputed audio features (distillation off) vs the bare transformers step.

    bash bench/gpu_check.sh              # on the GPU machine (< 5 minutes on one H100)
    python bench/gpu_check.py --tiny     # the same code path with tiny models, on CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

PRESETS = {
    "blip2_opt_clap": {"tiny": ("tiny-blip2-opt", "tiny-clap")},
    "llava_whisper": {"tiny": ("tiny-llava", "tiny-whisper")},
}


def _config(name: str, tmp: Path, args):
    from safe_av.config import load_config

    phase = ("[{name: fusion, train: [projector, fusion], lr: {projector: 5.0e-5, fusion: 1.0e-4}, "
             f"datasets: {{musicavqa: 1.0}}, max_steps: 1000, batch_size: {args.batch}, audio_ratio: 1.0}}]")
    ov = [f"data.root={tmp / 'data'}", "data.synthetic=true", "data.synth_videos=12", "data.synth_vqa_images=8",
          "data.synth_audio_clips=6", "data.feature_cache=null", "data.num_workers=0", "train.trackers=[]",
          "train.pretrain.enabled=false", "train.optim.grad_accum=1", f"train.phases={phase}",
          "model.dtype=bfloat16", "train.mixed_precision=bf16", "loss.distillation=true", "loss.retention=true",
          "loss.fisher=false", "curriculum.enabled=false"]
    if args.tiny:
        base, audio = PRESETS[name]["tiny"]
        ov += [f"model.base={base}", f"model.audio_encoder={audio}", "model.arch=null", "model.audio_arch=null",
               "model.num_audio_tokens=8", "model.projector.hidden_dim=64", "model.fusion.num_heads=4"]
    return load_config(C.ROOT / "configs" / f"{name}.yaml", ov)


def _real_base(cfg, texts, device):
    from transformers import (Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                              CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor)

    from safe_av.models.presets import build_tiny_tokenizer
    from safe_av.presets import load_arch

    config = load_arch(cfg.model.arch)
    config._attn_implementation = cfg.model.attn_implementation
    tok = build_tiny_tokenizer(texts)
    s = config.vision_config.image_size
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            if config.model_type == "blip-2":
                model = Blip2ForConditionalGeneration(config)
            else:
                model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    # sub-configs carry their checkpoint's dtype (OPT: float16); the Q-Former too goes to bf16, as
    # from_pretrained(dtype=bf16) leaves it (transformers keeps _keep_in_fp32_modules in fp32 under float16 only)
    model = model.to(dtype=torch.bfloat16)
    if config.model_type == "blip-2":
        proc = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": s, "width": s}), tokenizer=tok,
                              num_query_tokens=config.num_query_tokens)
    else:
        proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": s},
                                                                    crop_size={"height": s, "width": s}),
                              tokenizer=tok, patch_size=config.vision_config.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              image_token="<image>")
    return model.eval(), proc


def _real_audio(cfg, device):
    from transformers import ClapFeatureExtractor, ClapModel, WhisperFeatureExtractor, WhisperModel

    from safe_av.presets import load_arch

    config = load_arch(cfg.model.audio_arch)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = ClapModel(config) if config.model_type == "clap" else WhisperModel(config)
    finally:
        torch.set_default_dtype(old)
    model = model.to(dtype=torch.bfloat16)
    if config.model_type == "clap":  # laion/clap-htsat-unfused's preprocessor_config.json
        fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=10, hop_length=480,
                                  fft_window_size=1024, frequency_min=0, frequency_max=14000,
                                  truncation="rand_trunc", padding="repeatpad")
    else:  # openai/whisper-large-v3: 128 mel bins, 30 s chunks at 16 kHz
        fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000, chunk_length=30)
    return model.eval(), fe


def make_trainer_class():
    from safe_av.data.text import SAFEProcessor
    from safe_av.models.audio_encoders import AudioEncoder
    from safe_av.models.base_vl import BaseVL
    from safe_av.models.build import build_safe_model
    from safe_av.models.presets import build_tiny_audio, build_tiny_base
    from safe_av.training.loop import Trainer

    class RandomWeightsTrainer(Trainer):
        """The real Trainer; only the model comes from architecture files with random weights."""

        tiny = False

        def _build_model(self) -> None:
            cfg, device = self.cfg, self.acc.device
            texts = [t for s in self.train_corpus.samples + self.select_corpus.samples
                     for t in [s.question, *s.answers] if t]
            if self.tiny:
                model, proc = build_tiny_base(cfg.model.base, texts, seed=cfg.model.tiny_seed)
                model = model.to(device=device, dtype=torch.bfloat16)
                amodel, fe = build_tiny_audio(cfg.model.audio_encoder, seed=cfg.model.tiny_seed + 1)
                amodel = amodel.to(device=device, dtype=torch.bfloat16)
            else:
                model, proc = _real_base(cfg, texts, device)
                amodel, fe = _real_audio(cfg, device)
            if cfg.model.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            torch.manual_seed(cfg.train.seed)
            self.model = build_safe_model(cfg.model, base=BaseVL(model, proc), audio_encoder=AudioEncoder(amodel, fe))
            self.model.to(device)
            self.processor = SAFEProcessor.from_model(self.model, max_length=cfg.data.max_text_length)
            self.ddp_model = None

    return RandomWeightsTrainer


def check(name: str, args, tmp: Path) -> dict:
    from safe_av.flops import peak_flops, training_flops_per_step
    from safe_av.info import build_parts, model_summary

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = _config(name, tmp / name, args)
    T = make_trainer_class()
    T.tiny = args.tiny
    t0 = time.perf_counter()
    tr = T(cfg, tmp / name / "run")
    tr.setup()
    tr.curriculum = None
    tr.fisher = None
    build_s = time.perf_counter() - t0
    optim, sched, stream, _ = tr._start_phase(0)
    tr.ddp_model.train()
    w = tr._weights(cfg.train.phases[0])
    for _ in range(30):
        batch = C.audio_batch(stream)
        if bool(tr._distill_rows(batch).any()):
            break
    n_distill = int(tr._distill_rows(batch).sum())
    def timed(fn, warmup: int, steps: int):
        """Median time of ``fn()`` and peak allocated memory (None on CPU) over ``steps`` calls after ``warmup``,
        and ``fn``'s last return value."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, last = [], None
        for i in range(warmup + steps):
            sync()
            t = time.perf_counter()
            last = fn()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return C.median(times), (torch.cuda.max_memory_allocated() if cuda else None), last

    def run(weights, warmup: int, steps: int, on=None):
        """SAFE training steps on ``on`` (default: the batch): median time, peak memory, the last step's logs."""
        return timed(lambda: tr._optimizer_step(tr.ddp_model, optim, sched, C.FixedStream(on or batch), weights),
                     warmup, steps)

    step_s, peak, logs = run(w, args.warmup, args.steps)
    # the same model and batch with distillation + retention off (Q3 at real size)
    from dataclasses import replace

    short = max(2, args.steps // 2)
    step_off, peak_off, _ = run(replace(w, beta=0.0, gamma=0.0), 1, short)
    # the same with model.frozen_prefix off: the LM's backward also runs through the image positions
    tr.model.frozen_prefix = False
    step_np, peak_np, _ = run(w, 1, short)
    tr.model.frozen_prefix = True
    # Q1 at real size: SAFE with the clips' encoder features precomputed (what the feature cache gives) and
    # distillation + retention off, vs the bare transformers step on the same batch (_common.bare_step: the VL
    # model's own forward with SAFE's audio tokens as constant inputs, backward to them), LoRA layers unwrapped
    from safe_av.data.text import move_batch

    with torch.no_grad(), tr.acc.autocast():
        feats = tr.model.encode_audio(batch["audio"].to(tr.acc.device), batch["audio_valid_frac"].to(tr.acc.device))
    cached = dict(batch, audio=None, audio_valid_frac=None, audio_features=feats.cpu())
    step_cached, _, _ = run(replace(w, beta=0.0, gamma=0.0), 1, short, on=cached)
    undo = C.unwrap_lora(tr.model.base.model)
    try:
        bare, _ = C.bare_step(tr.model, move_batch(cached, tr.acc.device), autocast=tr.acc.autocast)
        step_bare, peak_bare, _ = timed(bare, 1, short)
    finally:
        C.rewrap_lora(undo)
    bs, seq = batch["input_ids"].shape
    v, k = tr.model.base.num_image_tokens, tr.model.num_audio_tokens
    text = int(seq - v - k)
    parts = build_parts(cfg)
    pred = model_summary(cfg, phase=0, parts=parts, text_tokens=text).memory
    flops = training_flops_per_step(cfg, phase=0, parts=parts, text_tokens=text)
    cfg.model.frozen_prefix = False
    pred_np = model_summary(cfg, phase=0, parts=parts, text_tokens=text).memory
    cfg.model.frozen_prefix = True
    device = torch.cuda.get_device_name() if cuda else "CPU"
    u = None
    pk = peak_flops(device)
    if pk:
        u = flops.total / step_s / pk
    out = {"model": name, "device": device, "tiny": args.tiny, "batch": int(bs), "seq": int(seq),
           "text_tokens": text, "distilled_rows": n_distill, "build_s": round(build_s, 1),
           "step_s": step_s, "samples_per_s": bs / step_s, "loss": None if logs is None else logs.get("loss/total"),
           "peak_allocated_gib": None if peak is None else peak / C_GIB,
           "predicted_peak_gib": pred.peak / C_GIB, "predicted": {k2: getattr(pred, k2) / C_GIB for k2 in
                                                                   ("weights", "gradients", "optimizer",
                                                                    "activations", "transient")},
           "flops_per_step": flops.total, "mfu": u, "step_s_no_distill": step_off,
           "peak_allocated_gib_no_distill": None if peak_off is None else peak_off / C_GIB,
           "step_s_no_prefix": step_np, "peak_allocated_gib_no_prefix": None if peak_np is None else peak_np / C_GIB,
           "predicted_peak_gib_no_prefix": pred_np.peak / C_GIB,
           "step_s_cached_no_distill": step_cached, "step_s_bare": step_bare,
           "peak_allocated_gib_bare": None if peak_bare is None else peak_bare / C_GIB,
           "gradient_checkpointing": cfg.model.gradient_checkpointing,
           "trainable_params": sum(p.numel() for p in tr.model.trainable_parameters().values())}
    del tr, optim, sched, stream, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


C_GIB = 2**30


def _versus(results: list[dict], a: str, b: str) -> str:
    """Per model: step time and peak of setting ``a`` over setting ``b`` (result-key suffixes; "" = default),
    with the prediction of each peak."""
    out = []
    for r in results:
        if "error" in r:
            continue
        text = f"{r['model']}: step x{r['step_s' + a] / r['step_s' + b]:.2f}"
        pa, pb = r.get("peak_allocated_gib" + a), r.get("peak_allocated_gib" + b)
        if pa is not None and pb is not None:
            pred = lambda k: f" (predicted {r['predicted_peak_gib' + k]:.2f})" if "predicted_peak_gib" + k in r else ""  # noqa: E731
            text += f", peak {pa:.2f}{pred(a)} vs {pb:.2f} GiB{pred(b)} (x{pa / pb:.3f})"
        out.append(text)
    return "; ".join(out)


def predict_only(args) -> int:
    """Predicted peaks for the real sizes (CPU, no weights): compare with a recorded GPU measurement."""
    from safe_av.info import build_parts, model_summary

    for item in args.predict_only or ["blip2_opt_clap:85", "llava_whisper:629"]:
        name, seq = item.split(":")
        cfg = _config(name, Path(tempfile.mkdtemp(prefix="bench-gpu-")), args)
        parts = build_parts(cfg)
        text = int(seq) - parts.num_visual_tokens - cfg.model.num_audio_tokens
        on = model_summary(cfg, phase=0, parts=parts, text_tokens=text).memory.peak / 2**30
        cfg.loss.distillation = cfg.loss.retention = False
        off = model_summary(cfg, phase=0, parts=parts, text_tokens=text).memory.peak / 2**30
        print(f"{name}: batch {args.batch} x {seq}: predicted peak {on:.2f} GiB (distillation + retention on), "
              f"{off:.2f} GiB (off)", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test of the same code path)")
    ap.add_argument("--models", default="blip2_opt_clap,llava_whisper")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", help="also write results.json and results.md into this folder")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--predict-only", nargs="*", metavar="MODEL:SEQ", default=None,
                    help="no GPU: print `safe info`'s predicted peak for the real-size presets at the measured "
                         "batch x sequence (e.g. blip2_opt_clap:85 llava_whisper:629), with and without the teacher")
    args = ap.parse_args()
    C.setup_threads()
    if args.predict_only is not None:
        return predict_only(args)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --tiny for the CPU smoke test", flush=True)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results = []
    for name in args.models.split(","):
        t = time.perf_counter()
        try:
            r = check(name, args, tmp)
        except torch.cuda.OutOfMemoryError as err:
            r = {"model": name, "error": f"CUDA out of memory: {err}"}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], "error: " + r["error"][:80]] + [""] * 8)
            continue
        meas = "n/a (CPU)" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f} GiB"
        ratio = "" if r["peak_allocated_gib"] is None else f"{r['predicted_peak_gib'] / r['peak_allocated_gib']:.3f}"
        rows.append([r["model"] + (" (tiny)" if r["tiny"] else ""), r["device"],
                     f"{r['batch']} x {r['seq']} ({r['text_tokens']} text)",
                     "yes" if r["gradient_checkpointing"] else "no", f"{r['step_s'] * 1e3:.0f} ms",
                     f"{r['samples_per_s']:.1f}", meas, f"{r['predicted_peak_gib']:.2f} GiB", ratio,
                     f"{r['flops_per_step'] / 1e12:.2f} T", "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"])
    body = ["Random weights from the shipped architecture files, bf16 weights + bf16 autocast, projector + fusion "
            "trained with AdamW, distillation + retention on, audio encoded on line; median step of "
            f"{args.steps} after {args.warmup} warm-up.", "",
            C.md_table(["model", "device", "batch x seq", "grad ckpt", "step", "samples/s", "peak allocated",
                        "predicted peak", "predicted / measured", "FLOPs/step", "MFU"], rows), "",
            "Distillation + retention vs off, same model and batch: "
            + _versus(results, "", "_no_distill") + ".", "",
            "`model.frozen_prefix=false` (the LM's backward also runs through the image positions) vs the default "
            "(on), same model and batch, distillation on: " + _versus(results, "_no_prefix", "") + ".", "",
            "SAFE step with the audio features precomputed (as the feature cache gives them) and distillation + "
            "retention off vs the bare transformers step on the same batch (the VL model's own forward + backward "
            "to SAFE's audio tokens as constant inputs; `bench/step_overhead.py`'s comparison at real size; issue "
            "target <= 1.15): " + "; ".join(f"{r['model']}: {r['step_s_cached_no_distill'] * 1e3:.0f} ms vs "
                                           f"{r['step_s_bare'] * 1e3:.0f} ms, x{r['step_s_cached_no_distill'] / r['step_s_bare']:.2f}"
                                           for r in results if "error" not in r) + ".", "",
            "FLOPs per step are `safe_av.flops.training_flops_per_step` (the distillation teacher's extra LM "
            "forward is not counted, so MFU is a slight under-estimate)."]
    text = C.report("gpu_check", "6. GPU check (real-size architectures, random weights)", body,
                    write=not args.no_write and not args.tiny)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_check.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
