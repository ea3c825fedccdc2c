"""``safe eval`` and ``safe infer``: load a trained SAFE adapter around the base it was trained with.

Loading (:func:`load_checkpoint`) accepts three kinds of folder:

- a run folder ``RUN/`` (its ``adapter/``; if the run never finished, its latest complete checkpoint),
- an adapter folder (``adapter.safetensors`` + ``adapter_config.json``),
- a training checkpoint ``RUN/checkpoints/step-XXXXXXX`` (``model.safetensors`` holds the adapter state,
  ``config.yaml`` the run's resolved config).

The model is rebuilt from the *run's* config (``config.yaml`` next to the weights), never from the
evaluation config, and around the *same* base: the folder recorded as ``base_path`` in
``adapter_config.json`` when training wrote one, else the deterministic pretrained tiny base of the
cache (:func:`safe_av.training.pretrain.pretrain_tiny_base`), else ``model.base`` itself.

:func:`evaluate_checkpoint` writes the metrics JSON (keys in ``docs/inference.md``) and one JSONL
line per (sample, condition) next to it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from safe_av.config import ModelConfig, SAFEConfig, from_dict, load_config
from safe_av.data.records import DataError, Sample
from safe_av.data.text import SAFEProcessor, move_batch
from safe_av.eval import evaluate as ev

log = logging.getLogger(__name__)

CAPTION_MAX_NEW_TOKENS = 24
"""Captions are longer than VQA answers: at least this many new tokens (``eval.max_new_tokens`` if larger)."""
RETRIEVAL_MAX_CLIPS = 100
"""Likelihood retrieval costs one LM pass per (clip, caption) pair: it runs on the first clips only."""
RETRIEVAL_KS = (1, 5, 10)


class InputError(ValueError):
    """A bad inference input; the message names the file / line / field."""


REQUEST_FIELDS = ("question", "image", "audio")
"""The fields of an inference request (``safe infer --input`` line, ``SAFE.answer_batch`` item)."""


def unknown_fields_error(request: dict, where: str) -> str | None:
    """The error for a request with fields besides :data:`REQUEST_FIELDS` (a misspelt ``img``/``audo`` would
    otherwise be dropped silently), or None."""
    unknown = set(request) - set(REQUEST_FIELDS)
    if not unknown:
        return None
    return f"{where}: unknown field(s) {sorted(unknown)} (known: {', '.join(REQUEST_FIELDS)})"


# ================================================================== locating what to load


@dataclass
class CheckpointFiles:
    kind: str
    """``run``, ``adapter`` or ``checkpoint``."""
    weights: Path
    """The adapter folder, or the checkpoint folder holding ``model.safetensors``."""
    config: Path | None
    """The run's resolved ``config.yaml``, if one was found."""
    adapter_config: dict = field(default_factory=dict)
    """``adapter_config.json`` (of the adapter, or of the run's adapter for a checkpoint), or {}."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


CHECKPOINT_META_KEYS = ("base_path", "audio_encoder_path", "base_family", "audio_kind", "base_fingerprint",
                        "audio_encoder_fingerprint")
"""What a training checkpoint's ``meta.json`` may record about the base and audio encoder (as ``adapter_config.json``
does): a run that never finished can be loaded around the same base from any working directory."""


def locate_checkpoint(path: str | Path) -> CheckpointFiles:
    """What ``path`` is (run / adapter / training checkpoint) and where its weights and config are."""
    from safe_av.models.safe_model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p}: expected a folder (a run, its adapter/ or a checkpoint)")
    if (p / ADAPTER_CONFIG).is_file():  # an adapter folder
        cfg = p.parent / "config.yaml"
        return CheckpointFiles("adapter", p, cfg if cfg.is_file() else None, _read_json(p / ADAPTER_CONFIG))
    if (p / "model.safetensors").is_file():  # a training checkpoint
        cfg = p / "config.yaml"
        if not cfg.is_file():
            run_cfg = p.parent.parent / "config.yaml"
            cfg = run_cfg if run_cfg.is_file() else None
        run_adapter = p.parent.parent / "adapter" / ADAPTER_CONFIG
        meta = {}
        if run_adapter.is_file():
            meta.update(_read_json(run_adapter))
        if (p / "meta.json").is_file():
            meta.update({k: v for k, v in _read_json(p / "meta.json").items() if k in CHECKPOINT_META_KEYS})
        return CheckpointFiles("checkpoint", p, cfg, meta)
    if (p / "adapter" / ADAPTER_CONFIG).is_file():  # a finished run
        cfg = p / "config.yaml"
        return CheckpointFiles("run", p / "adapter", cfg if cfg.is_file() else None,
                               _read_json(p / "adapter" / ADAPTER_CONFIG))
    from safe_av.training.checkpoint import find_latest

    latest = find_latest(p) if (p / "checkpoints").is_dir() else None
    if latest is not None:  # a run that did not finish: its latest complete checkpoint
        log.info("%s has no adapter/: using its latest checkpoint %s", p, latest)
        return locate_checkpoint(latest)
    raise FileNotFoundError(f"checkpoint {p}: neither a run folder (adapter/{ADAPTER_CONFIG}), an adapter folder "
                            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) nor a training checkpoint (model.safetensors)")


def model_config(files: CheckpointFiles, cfg: SAFEConfig | None) -> SAFEConfig:
    """The config the model is rebuilt from: the run's ``config.yaml`` when there is one, else ``cfg``
    (default config when None) with ``base``/``audio_encoder`` (and ``model``, if recorded) from the adapter."""
    if files.config is not None:
        run_cfg = load_config(files.config)
        if cfg is not None and cfg.model != run_cfg.model:
            log.warning("the evaluation config's model section differs from the run's (%s): the model is rebuilt "
                        "as the run built it", files.config)
        return run_cfg
    out = copy.deepcopy(cfg) if cfg is not None else SAFEConfig()
    meta = files.adapter_config
    if isinstance(meta.get("model"), dict):
        out.model = from_dict(ModelConfig, meta["model"], "adapter_config.model")
    for key in ("base", "audio_encoder"):
        if meta.get(key) and meta[key] != getattr(out.model, key):
            log.info("model.%s=%r from %s (the config said %r)", key, meta[key], files.weights, getattr(out.model, key))
            setattr(out.model, key, meta[key])
    return out


def _existing_dir(value: str, relative_to: list[Path]) -> Path | None:
    p = Path(value)
    candidates = [p] if p.is_absolute() else [p, *(r / p for r in relative_to)]
    return next((c for c in candidates if c.is_dir()), None)


def pretrain_inputs(cfg: SAFEConfig) -> tuple[list[Sample], list[Sample]]:
    """The (image-only training samples, vocabulary samples) training gives :func:`pretrain_tiny_base`.

    Mirrors ``Trainer._prepare_data`` / ``Trainer._build_model``, so the cache key is the run's.
    """
    from safe_av.training.data import eval_datasets, read_corpus
    from safe_av.training.loop import image_question

    names = sorted({d for p in cfg.train.phases for d in p.datasets} | {cfg.data.vqa_dataset})
    train = read_corpus(cfg.data, names, "train")
    select = read_corpus(cfg.data, eval_datasets(cfg), cfg.data.select_split)  # what Trainer reads for it
    vl_train = [s for s in train.samples if s.image is not None and (s.audio is None or image_question(s))]
    return vl_train, train.samples + select.samples  # never the split reported on


def resolve_base(cfg: SAFEConfig, files: CheckpointFiles, *, allow_pretrain: bool = False) -> str | None:
    """The folder of the base the run was trained on, or None when ``cfg.model.base`` itself is it.

    Order: ``base_path`` recorded in ``adapter_config.json``; for a tiny base with ``train.pretrain``, the
    pretrained base of the cache (re-pretrained, deterministically, only with ``allow_pretrain``).
    """
    recorded = _recorded_folder(files, "base_path")
    if recorded:
        return recorded
    from safe_av.models.presets import TINY_BASES

    if not (cfg.model.base in TINY_BASES and cfg.train.pretrain.enabled):
        return None
    from safe_av.training.pretrain import pretrain_tiny_base, pretrained_base_folder

    if cfg.data.synthetic and not (Path(cfg.data.root) / "synthetic_meta.json").is_file() and allow_pretrain:
        from safe_av.data.synthetic import ensure_synthetic

        ensure_synthetic(cfg.data)
    try:
        vl_train, vocab = pretrain_inputs(cfg)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the run pretrained its tiny base ({cfg.model.base}) on {cfg.data.root}, which "
                                f"cannot be read here ({err}); without base_path in adapter_config.json the base "
                                "cannot be found") from err
    return _cached_or_pretrained(cfg, pretrained_base_folder(cfg, vl_train, vocab), "tiny base", allow_pretrain,
                                 lambda device: pretrain_tiny_base(cfg, vl_train, vocab, device=device))


def resolve_audio_encoder(cfg: SAFEConfig, files: CheckpointFiles, *, allow_pretrain: bool = False) -> str | None:
    """The folder of the audio encoder the run used, or None when ``cfg.model.audio_encoder`` itself is it.

    Order: ``audio_encoder_path`` recorded in ``adapter_config.json``; for a tiny encoder with
    ``train.pretrain.audio``, the cache's pretrained encoder (re-pretrained, deterministically, only with
    ``allow_pretrain``).
    """
    recorded = _recorded_folder(files, "audio_encoder_path")
    if recorded:
        return recorded
    from safe_av.training.pretrain_audio import pretrain_tiny_audio, pretrained_audio_folder, wants_audio_pretraining

    if not wants_audio_pretraining(cfg):
        return None
    return _cached_or_pretrained(cfg, pretrained_audio_folder(cfg), "tiny audio encoder", allow_pretrain,
                                 lambda device: pretrain_tiny_audio(cfg, device=device))


def _recorded_folder(files: CheckpointFiles, key: str) -> str | None:
    """The folder ``adapter_config.json`` records under ``key``, if it exists here."""
    recorded = files.adapter_config.get(key)
    if not recorded:
        return None
    found = _existing_dir(str(recorded), [files.weights, files.weights.parent])
    if found is None:
        log.warning("adapter_config.json records %s=%r, which does not exist here: looking for it as training "
                    "does", key, recorded)
    return None if found is None else str(found)


def _cached_or_pretrained(cfg: SAFEConfig, folder: Path, what: str, allow_pretrain: bool, pretrain) -> str:
    """A pretrained tiny model's cache folder; re-made (deterministic from seed and data) only when allowed."""
    from safe_av.training.build_once import is_built

    if is_built(folder):
        return str(folder)
    if not allow_pretrain:
        raise FileNotFoundError(f"the run's pretrained {what} {folder} is not in the cache (train.pretrain."
                                f"cache_dir={cfg.train.pretrain.cache_dir}, relative to the working directory); "
                                "run `safe eval` once to re-create it, or pass the run's working directory")
    log.warning("the run's pretrained %s %s is missing: pretraining it again (deterministic from the seed and data; "
                "identical to the run's when pretrained on the same kind of device)", what, folder)
    return str(pretrain("cuda" if torch.cuda.is_available() else "cpu"))


# ================================================================== loading


@dataclass
class LoadedCheckpoint:
    model: object
    """The :class:`~safe_av.models.safe_model.SAFEModel`, in eval mode."""
    processor: SAFEProcessor
    cfg: SAFEConfig
    """The config the model was rebuilt from (the run's)."""
    files: CheckpointFiles
    base_path: str | None
    """The base folder used (None: ``cfg.model.base`` by name)."""
    audio_encoder_path: str | None = None
    """The audio encoder folder used (None: ``cfg.model.audio_encoder`` by name)."""


def _base_unfreeze(cfg: SAFEConfig) -> list[str]:
    return sorted({m for p in cfg.train.phases if "base" in p.train for m in p.unfreeze})


def _load_state(model, path: Path) -> None:
    """Copy a training checkpoint's adapter state into ``model``, strictly (``SAFEModel.load_adapter_state``:
    unknown names, missing tensors and shape mismatches are errors naming the file; the parameters of a base
    module no phase had unfrozen yet when the checkpoint was written may be absent)."""
    from safetensors.torch import load_file

    model.load_adapter_state(load_file(str(path)), path, partial_base=True)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA if available, else CPU), refused with a clear error when this
    machine / torch build cannot run on it.

    Raises:
        ValueError: not a device name, or a device that is not available here.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); use device='cpu', or None for the default")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}: MPS is not available here; use device='cpu', or None for the default")
    return dev


def load_checkpoint(checkpoint: str | Path, cfg: SAFEConfig | None = None, *, device: str | torch.device | None = None,
                    allow_pretrain: bool = False) -> LoadedCheckpoint:
    """Rebuild a trained SAFE model (see the module docstring) on ``device`` (default: CUDA if available).

    Raises:
        FileNotFoundError: nothing loadable at ``checkpoint``, or its base cannot be found.
        ValueError: ``device`` is not available here; the base / audio encoder is of another family / kind than
            the adapter records; the weights have unknown or missing tensors or other shapes.
    """
    from safe_av.models.build import build_audio_encoder, build_base, build_safe_model
    from safe_av.models.safe_model import ADAPTER_CONFIG, SAFEModel, check_adapter_family

    device = resolve_device(device)
    files = locate_checkpoint(checkpoint)
    source = files.weights if files.kind == "checkpoint" else files.weights / ADAPTER_CONFIG
    run_cfg = model_config(files, cfg)
    base_path = resolve_base(run_cfg, files, allow_pretrain=allow_pretrain)
    base = build_base(run_cfg.model, base=base_path)
    check_adapter_family(files.adapter_config, source, base=base)  # before the encoder and the adapter
    audio_path = resolve_audio_encoder(run_cfg, files, allow_pretrain=allow_pretrain)
    encoder = build_audio_encoder(run_cfg.model, path=audio_path)
    check_adapter_family(files.adapter_config, source, audio_encoder=encoder)
    if files.kind == "checkpoint":
        # anchors (original weights) for every base module any phase unfroze, taken before loading
        model = build_safe_model(run_cfg.model, base=base, audio_encoder=encoder, unfreeze=_base_unfreeze(run_cfg))
        model.check_fingerprints(files.adapter_config, source)
        _load_state(model, files.weights / "model.safetensors")
    else:
        model = SAFEModel.from_pretrained(files.weights, base=base, audio_encoder=encoder)
    model.requires_grad_(False)
    model.to(device).eval()
    model.anchors = {k: v.to(device) for k, v in model.anchors.items()}  # a plain dict: .to() does not move it
    processor = SAFEProcessor.from_model(model, max_length=run_cfg.data.max_text_length)
    log.info("loaded %s (%s) around base %s", files.weights, files.kind, base_path or run_cfg.model.base)
    return LoadedCheckpoint(model, processor, run_cfg, files, base_path, audio_path)


# ================================================================== the original model, as a view


class _Generate(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, **kwargs):
        return self.model.generate_from_batch(batch, **kwargs)


class OriginalModel:
    """The original VL model as a view of a SAFE model, for :func:`safe_av.eval.evaluate.predict`.

    Audio dropped, LoRA adapters disabled and unfrozen base modules called with their anchor (original)
    weights through ``torch.func.functional_call`` - the generation twin of ``SAFEModel.teacher_forward``.
    """

    def __init__(self, model):
        self.model = model
        self._gen = _Generate(model)

    @property
    def device(self):
        return self.model.device

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    @torch.no_grad()
    def generate_from_batch(self, batch: dict, *, max_new_tokens: int = 8, use_audio: bool = True,
                            audio_permutation=None) -> list[str]:
        kwargs = dict(max_new_tokens=max_new_tokens, use_audio=False)
        with self.model.adapters_disabled():
            if self.model.anchors:
                weights = {f"model.{k}": v for k, v in self.model.anchors.items()}
                return torch.func.functional_call(self._gen, weights, args=(batch,), kwargs=kwargs, strict=False)
            return self.model.generate_from_batch(batch, **kwargs)


# ================================================================== evaluation


def _run_select_split(loaded) -> str:
    """The split the run's training evaluated on: its ``data.select_split``; for a run from before that key (its
    config.yaml lacks it), its ``data.eval_split``, which then served both."""
    raw = {}
    if loaded.files.config and Path(loaded.files.config).is_file():
        try:
            raw = yaml.safe_load(Path(loaded.files.config).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            raw = {}
    data = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(data, dict) and "select_split" not in data and isinstance(data.get("eval_split"), str):
        log.info("%s has no data.select_split (a run from before it): its training evaluated on its "
                 "data.eval_split %r", loaded.files.config, data["eval_split"])
        return data["eval_split"]
    return loaded.cfg.data.select_split


def _without_selection(cfg: SAFEConfig, run_cfg: SAFEConfig, splits: dict, vqa: list[Sample], avqa: list[Sample],
                       chosen_split: str):
    """The VQA and AVQA sets without the images and videos the run's own evaluations read during training, where
    the evaluated split is the one they read (``chosen_split``: the run's ``data.select_split``), as the run's final
    metrics leave them out; then capped at ``eval.max_samples``. Returns ``((vqa, avqa), held_out counts,
    chosen_split)``."""
    from safe_av.training.data import Corpus, eval_datasets, held_out, read_corpus, selection

    held = {"vqa": 0, "avqa": 0}
    if cfg.data.select_split != chosen_split:
        log.warning("data.select_split=%r of the evaluation config is not used: the questions left out are those the "
                    "run evaluated on during training, in its own split %r", cfg.data.select_split, chosen_split)
    if chosen_split in (splits["vqa"], splits["avqa"]):
        corpus = Corpus()
        for name in eval_datasets(run_cfg):
            if (Path(cfg.data.root) / name).is_dir():
                try:
                    corpus.samples += read_corpus(cfg.data, [name], chosen_split).samples
                except FileNotFoundError as err:  # no such split here: nothing of it was chosen on
                    log.info("held-out selection: %s", err)
        chosen = selection(run_cfg, corpus)
        vqa, held["vqa"] = held_out(chosen.vqa_subset, vqa, same_split=splits["vqa"] == chosen_split)
        avqa, held["avqa"] = held_out(chosen.avqa, avqa, same_split=splits["avqa"] == chosen_split)
    for name, k in held.items():
        if k:
            log.info("%d %s question(s) of split %r left out: they share an image or video with the questions the "
                     "run evaluated on during training (its data.select_split)", k, name, splits[name])
    cap = cfg.eval.max_samples
    return (vqa[:cap], avqa[:cap]), held, chosen_split


def _explain_missing(missing: dict, cfg: SAFEConfig, split: str | None) -> None:
    """Say on the console which evaluation sets are absent and where their split came from (a typo in a split key
    would otherwise only show in the JSON's ``missing_datasets``); VQA v2 has no public test answers."""
    for name in list(missing):
        used = split or cfg.data.final_split(name)
        if name == cfg.data.vqa_dataset == "vqav2" and used.startswith("test") and (Path(cfg.data.root) / name).is_dir():
            missing[name] += ("; VQA v2 publishes no test answers: its final metrics use data.vqa_eval_split "
                              f"({cfg.data.vqa_eval_split!r}); drop --split or use --split val")
        source = "--split" if split else "data." + cfg.data.final_split_key(name)
        log.warning("%s is not evaluated (%s=%r): %s", name, source, used, missing[name])


def _read_split(cfg: SAFEConfig, name: str, split: str, missing: dict, bad: list | None = None, *,
                cap: bool = True, skipped: dict | None = None) -> list[Sample]:
    """The scorable samples of one set's split (``read_corpus``: bad entries logged and added to ``bad``, the
    reader's deliberate skips and the questions without answers counted into ``skipped``); a split that is absent,
    or has questions but no answers at all (a test split's), is ``missing``: nothing to score."""
    from safe_av.training.data import read_corpus

    root = Path(cfg.data.root) / name
    if not root.is_dir():
        missing[name] = f"{root} not found"
        return []
    try:
        corpus = read_corpus(cfg.data, [name], split)
    except FileNotFoundError as err:
        missing[name] = str(err)
        return []
    if bad is not None:
        bad.extend(corpus.bad)
    if skipped is not None:
        skipped.update(corpus.skipped)
    samples = corpus.samples
    unanswered = corpus.skipped.get(name, {}).get("no answers", 0)
    if not samples and unanswered:
        missing[name] = (f"split {split!r} has {unanswered} questions but no answers (annotations not published): "
                         "nothing to score")
        return []
    if cap and cfg.eval.max_samples is not None:
        samples = samples[: cfg.eval.max_samples]
    return samples


def _predictions_path(output: Path) -> Path:
    return output.with_name((output.stem if output.suffix == ".json" else output.name) + ".predictions.jsonl")


def _per_token_nll(out) -> torch.Tensor:
    """(B,) mean answer-token negative log-likelihood per row."""
    logits, labels = out.token_logits.float(), out.token_labels
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T')
    mask = (labels != -100).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def caption_retrieval(model, processor: SAFEProcessor, samples: list[Sample], *, max_seconds: float = 10.0,
                      batch_size: int = 16, max_clips: int = RETRIEVAL_MAX_CLIPS, feature_cache=None) -> dict:
    """Audio<->text retrieval by the model's own caption likelihood.

    ``sim[i, j] = -mean token NLL of caption j given clip i`` (captioning prompt, no image), then
    :func:`safe_av.eval.metrics.retrieval_metrics` (R@k, mAP@10 both ways). SAFE has no joint embedding
    space, so this generative score is the honest retrieval it supports; it costs n_audio x n_text LM passes.
    """
    from safe_av.eval.metrics import retrieval_metrics

    candidates = [s for s in samples if s.audio and s.answers][: max_clips]
    if feature_cache is None:
        feature_cache = MemoryFeatureCache()
        feature_cache.build(model, [s.audio for s in candidates], max_seconds=max_seconds, batch_size=batch_size)
    clips, feats = [], []
    for s in candidates:
        try:
            feats.append(feature_cache.get(s.audio))
        except (DataError, KeyError) as err:
            log.warning("retrieval: skipped %s/%s: %s", s.dataset, s.id, err)
            continue
        clips.append(s)
    if len(clips) < 2:
        return {"skipped": f"needs at least 2 clips with captions, has {len(clips)}"}
    captions = [(i, c) for i, s in enumerate(clips) for c in s.answers]
    sim = torch.empty(len(clips), len(captions))
    for i, f in enumerate(feats):
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            items = [{"question": "", "answer": c, "image": None, "audio_features": f, "meta": {}} for _, c in chunk]
            batch = move_batch(processor.collate(items), model.device)
            sim[i, start:start + len(chunk)] = -_per_token_nll(model(**batch)).cpu()
    out = retrieval_metrics(sim, [i for i, _ in captions], ks=RETRIEVAL_KS)
    out.update(method="caption log-likelihood given the audio (captioning prompt, no image)",
               n_audio=len(clips), n_text=len(captions),
               chance={"text_to_audio": {f"R@{k}": min(1.0, k / len(clips)) for k in RETRIEVAL_KS}})
    return out


def _avqa_block(prefix: str, scored: dict) -> dict:
    return {f"{prefix}avqa_accuracy": scored["overall"], f"{prefix}avqa_accuracy_by_type": scored["table"],
            f"{prefix}audio_dependent_accuracy": scored["audio_dependent"],
            f"{prefix}temporal_accuracy": scored["temporal"]}


def evaluate_checkpoint(cfg: SAFEConfig, checkpoint: str, *, split: str | None = None, output: str) -> dict:
    """``safe eval``: evaluate a trained adapter and write ``output`` (JSON) + per-sample predictions (JSONL).

    Args:
        cfg: the evaluation config: ``data`` (root, dataset names, ``eval_split``, ``vqa_eval_split``) and ``eval`` (batch size,
            ``max_new_tokens``, ``max_samples``). The model is rebuilt from the run's own config.
        checkpoint: a run folder, an adapter folder or a training checkpoint folder.
        split: one split for every set; default: VQA from ``cfg.data.vqa_eval_split``, the others from
            ``cfg.data.eval_split`` (the splits a run's final metrics use).
        output: the JSON file to write; predictions go to ``<output stem>.predictions.jsonl`` beside it.

    Returns:
        The metrics written (keys in ``docs/inference.md``).
    """
    from safe_av.eval.metrics import caption_metrics

    splits = {"vqa": split or cfg.data.final_split(cfg.data.vqa_dataset), "avqa": split or cfg.data.eval_split,
              "caption": split or cfg.data.eval_split}
    out_path = Path(output)
    loaded = load_checkpoint(checkpoint, cfg, allow_pretrain=True)
    model, processor = loaded.model, loaded.processor
    missing: dict[str, str] = {}
    bad: list = []
    skipped: dict[str, dict[str, int]] = {}
    vqa = _read_split(cfg, cfg.data.vqa_dataset, splits["vqa"], missing, bad, cap=False, skipped=skipped)
    avqa = _read_split(cfg, cfg.data.avqa_dataset, splits["avqa"], missing, bad, cap=False, skipped=skipped)
    caps = (_read_split(cfg, cfg.data.caption_dataset, splits["caption"], missing, bad, skipped=skipped)
            if cfg.data.caption_dataset else [])
    _explain_missing(missing, cfg, split)
    (vqa, avqa), held, selection_split = _without_selection(cfg, loaded.cfg, splits, vqa, avqa,
                                                            _run_select_split(loaded))
    if not (vqa or avqa or caps):
        shown = repr(split) if split else ", ".join(f"{k} {v!r}" for k, v in splits.items())
        raise NoEvaluationData(f"nothing to evaluate in split {shown} under {cfg.data.root}: "
                               + "; ".join(f"{k}: {v}" for k, v in missing.items())
                               + (f"; {len(bad)} annotation entries rejected (see the warnings)" if bad else ""))
    cache = _feature_cache(cfg, model, [s.audio for s in avqa + caps if s.audio])

    def run(samples, target=model, **kw):
        return ev.predict(target, processor, samples, batch_size=cfg.eval.batch_size,
                          max_new_tokens=kw.pop("max_new_tokens", cfg.eval.max_new_tokens),
                          max_seconds=cfg.data.max_audio_seconds, feature_cache=cache, **kw)

    original = OriginalModel(model)
    predictions = ev.PredictionLog()  # the records themselves: their score / correct are set after keep()
    keep = predictions.keep

    result: dict = {
        "checkpoint": str(checkpoint), "checkpoint_kind": loaded.files.kind, "weights": str(loaded.files.weights),
        "run_config": str(loaded.files.config) if loaded.files.config else None,
        "base": loaded.cfg.model.base, "base_path": loaded.base_path, "audio_encoder": loaded.cfg.model.audio_encoder,
        "audio_encoder_path": loaded.audio_encoder_path, "split": split, "splits": splits, "data_root": cfg.data.root,
        "missing_datasets": missing, "selection_split": selection_split, "held_out": held,
        "n_samples": {"vqa": len(vqa), "avqa": len(avqa), "caption": len(caps)}, "bad_annotations": len(bad),
        "skipped_annotations": skipped,
    }
    evaluated = {}
    if vqa:
        safe_recs = keep(run(vqa), "vqa", "safe")
        orig_recs = keep(run(vqa, target=original), "vqa", "original")
        safe_acc, orig_acc = ev.score_vqa(safe_recs), ev.score_vqa(orig_recs)
        evaluated["vqa"] = len(safe_recs)
        result.update(original_vqa_accuracy=orig_acc, safe_vqa_accuracy=safe_acc,
                      vl_retention=safe_acc / orig_acc if (orig_acc and safe_acc is not None) else None,
                      feature_similarity=ev.feature_similarity(model, processor, ev.loaded(vqa, safe_recs)[:64],
                                                               batch_size=cfg.eval.batch_size))
    if avqa:
        recs = keep(run(avqa), "avqa", "safe")
        full = ev.score_avqa(recs)
        avqa = ev.loaded(avqa, recs)  # every other condition and baseline on the questions whose files loaded
        masked = ev.score_avqa(keep(run(avqa, use_audio=False), "avqa", "audio_removed"))
        shuffled = ev.score_avqa(keep(run(avqa, shuffle_audio=True), "avqa", "audio_shuffled"))
        orig = ev.score_avqa(keep(run(avqa, target=original), "avqa", "original"))
        evaluated["avqa"] = full["n"]
        result.update(_avqa_block("", full))
        result["avqa_accuracy_by_question_type"] = full["by_type"]
        result["avqa_question_counts"] = full["counts"]
        result.update(_avqa_block("audio_masked_", masked))
        result.update(_avqa_block("audio_shuffled_", shuffled))
        result.update(_avqa_block("original_", orig))
        train_avqa = _read_split(_uncapped(cfg), cfg.data.avqa_dataset, "train", {})
        base = ev.chance_accuracy(train_avqa, avqa) if (train_avqa and avqa) else {}
        result.update(avqa_chance_accuracy=base.get("chance"), avqa_majority_accuracy=base.get("majority"),
                      audio_dependent_chance_accuracy=base.get("audio_dependent_chance"),
                      audio_dependent_majority_accuracy=base.get("audio_dependent_majority"))
        gain = lambda a, b: a - b if a is not None and b is not None else None  # noqa: E731
        result["audio_gain"] = {
            "avqa_vs_audio_removed": gain(full["overall"], masked["overall"]),
            "avqa_vs_audio_shuffled": gain(full["overall"], shuffled["overall"]),
            "audio_dependent_vs_audio_removed": gain(full["audio_dependent"], masked["audio_dependent"]),
            "audio_dependent_vs_audio_shuffled": gain(full["audio_dependent"], shuffled["audio_dependent"]),
        }
    if caps:
        recs = keep(run(caps, max_new_tokens=max(cfg.eval.max_new_tokens, CAPTION_MAX_NEW_TOKENS)), "caption", "safe")
        evaluated["caption"] = len(recs)
        result["caption_metrics"] = caption_metrics([r["prediction"] for r in recs], [r["answers"] for r in recs]) \
            if recs else None
        result["retrieval"] = caption_retrieval(model, processor, caps, max_seconds=cfg.data.max_audio_seconds,
                                                batch_size=cfg.eval.batch_size, feature_cache=cache)
    result["n_evaluated"] = evaluated
    # questions whose clip was longer than data.max_audio_seconds and was cut (the "safe" condition's records)
    result["n_truncated_audio"] = {name: ev.truncated(predictions.of(name, "safe"))
                                   for name in ("avqa", "caption") if name in evaluated}
    result["skipped_samples"] = sum(result["n_samples"][k] - evaluated.get(k, 0) for k in result["n_samples"])
    pred_path = _predictions_path(out_path)
    result["predictions_file"] = str(pred_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    predictions.write(pred_path)
    out_path.write_text(json.dumps(json_safe(result), indent=2))
    return result


class NoEvaluationData(FileNotFoundError):
    """``safe eval`` found no annotations of their splits for any of its evaluation sets."""


def _uncapped(cfg: SAFEConfig) -> SAFEConfig:
    out = copy.deepcopy(cfg)
    out.eval.max_samples = None
    return out


def json_safe(obj):
    """NaN/inf -> None (recursively), so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class MemoryFeatureCache:
    """Frozen audio features of each file, encoded once and kept in memory (``FeatureCache``'s ``get``).

    Evaluation runs every clip through several conditions (full, audio removed, shuffled, captions,
    retrieval); the encoder is frozen, so one encoding per file serves them all.
    """

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}
        self.errors: dict[str, DataError] = {}
        self.cut: dict[str, float] = {}  # path -> full duration of a clip encoded from its first max_seconds

    def cut_duration(self, path) -> float | None:
        """The full duration of ``path``'s clip when it was cut to ``max_seconds`` before encoding, else None."""
        return self.cut.get(str(path))

    def get(self, path) -> torch.Tensor:
        return self.lookup(path)[0]

    def lookup(self, path) -> tuple[torch.Tensor, float | None]:
        """Features of ``path`` and :meth:`cut_duration`'s value (as :meth:`FeatureCache.lookup`)."""
        key = str(path)
        if key in self.errors:
            raise self.errors[key]
        if key not in self.features:
            raise KeyError(f"{path}: not encoded")
        return self.features[key], self.cut.get(key)

    def __contains__(self, path) -> bool:
        return str(path) in self.features

    def build(self, model, paths: list[str], *, max_seconds: float, batch_size: int = 16) -> dict:
        from safe_av.data.cache import encode_files

        todo = [p for p in dict.fromkeys(str(p) for p in paths) if p not in self.features and p not in self.errors]
        self.max_seconds = max_seconds
        for p, feat in encode_files(model, todo, max_seconds=max_seconds, batch_size=batch_size, truncated=self.cut):
            if isinstance(feat, DataError):
                self.errors[p] = feat
            else:
                self.features[p] = feat
        return {"encoded": len(self.features), "bad": len(self.errors)}


def _feature_cache(cfg: SAFEConfig, model, paths: list[str]):
    """The frozen-feature cache of ``data.feature_cache`` (files it lacks are encoded first), else an
    in-memory one."""
    if not cfg.data.feature_cache:
        cache = MemoryFeatureCache()
        cache.build(model, paths, max_seconds=cfg.data.max_audio_seconds, batch_size=cfg.eval.batch_size)
        return cache
    from safe_av.data.cache import FeatureCache

    cache = FeatureCache.open(cfg.data.feature_cache, model, max_seconds=cfg.data.max_audio_seconds)
    stats = cache.build(model, sorted(set(paths)))
    log.info("feature cache %s: %s", cache.dir, stats)
    return cache


# ================================================================== safe infer


def _jsonl_requests(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, request or None, error or None) per non-blank line of a JSONL file."""
    out = []
    with open(path, "rb") as f:  # decoded line by line: one bad byte costs its line, not the file
        for n, data in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as err:
                out.append((n, None, f"{where}: not UTF-8 (byte {data[err.start]:#04x} at column {err.start + 1})"))
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                out.append((n, None, f"{where}: not valid JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(obj, dict):
                out.append((n, None, f"{where}: expected a JSON object with 'question', got {type(obj).__name__}"))
                continue
            if "question" not in obj:
                out.append((n, obj, f"{where}: field 'question' is missing"))
                continue
            unknown = unknown_fields_error(obj, where)
            if unknown:
                out.append((n, obj, unknown))
                continue
            bad = [k for k in REQUEST_FIELDS if k in obj and obj[k] is not None
                   and not isinstance(obj[k], str)]
            if bad:
                out.append((n, obj, f"{where}: field {bad[0]!r} must be a string, got {type(obj[bad[0]]).__name__}"))
                continue
            out.append((n, obj, None))
    return out


def output_problem(path: str | Path, flag: str = "--output") -> str | None:
    """Why ``path`` cannot be written as a file (checked before any work: `safe eval` and `safe infer` used to
    find out only after generating every answer), or None."""
    path = Path(path)
    if path.is_dir():
        return f"{flag} {path}: is a directory; give a file name"
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK):
        return f"{flag} {path}: {parent} is not writable"
    return None


def _resolve_input(obj: dict, base: Path) -> dict:
    """``obj`` with relative image/audio paths read from the working directory, else from ``base`` (the JSONL's
    folder). The request itself is left as written: the output echoes it."""
    out = dict(obj)
    for k in ("image", "audio"):
        if out.get(k) and not Path(out[k]).is_absolute() and not Path(out[k]).exists() and (base / out[k]).exists():
            out[k] = str(base / out[k])
    return out


def infer_main(args) -> int:
    """``safe infer``: one question (``--question`` with ``--image``/``--audio``) or a JSONL (``--input``).

    Returns 0 when every question was answered, 1 when an input failed (each failure is printed, and in
    ``--input`` mode written to ``--output`` as ``{"line": n, "error": ...}``), 2 on a usage error.
    """
    from safe_av import api

    if bool(args.input) == (args.question is not None):  # --question "" asks for a caption
        print("safe infer: error: give either --question (with --image and/or --audio) or --input FILE.jsonl"
              + (", not both" if args.input else ""), file=sys.stderr)
        return 2
    if args.input and (args.image or args.audio):
        print("safe infer: error: --image/--audio go with --question, not --input", file=sys.stderr)
        return 2
    if args.output and not args.input:
        print("safe infer: error: --output goes with --input", file=sys.stderr)
        return 2
    if args.input and not Path(args.input).is_file():
        print(f"safe infer: error: --input {args.input}: file not found", file=sys.stderr)
        return 2
    if args.output and (problem := output_problem(args.output)):
        print(f"safe infer: error: {problem}", file=sys.stderr)
        return 2
    max_new = getattr(args, "max_new_tokens", None)
    if max_new is not None and max_new < 1:
        print(f"safe infer: error: --max-new-tokens {max_new}: must be >= 1", file=sys.stderr)
        return 2
    model = api.load(args.checkpoint, max_new_tokens=max_new if max_new is not None else 16)
    if args.question is not None:
        try:
            print(model.answer(args.question, image=args.image, audio=args.audio))
        except InputError as err:
            print(f"safe infer: error: {err}", file=sys.stderr)
            return 1
        return 0
    src = Path(args.input)
    requests = _jsonl_requests(src)
    results: dict[int, dict] = {}
    good = []
    for n, obj, err in requests:
        if err is None:
            try:
                req = _resolve_input(obj, src.parent)
                good.append((n, obj, model.prepare(req["question"], req.get("image"), req.get("audio"),
                                                   where=f"{src}:{n}")))
                continue
            except InputError as e:
                err = str(e)
        results[n] = {"line": n, "error": err}
        print(f"safe infer: error: {err}", file=sys.stderr)
    for start in range(0, len(good), model.batch_size):
        chunk = good[start:start + model.batch_size]
        answers = model.generate_items([item for _, _, item in chunk])
        for (n, obj, _), ans in zip(chunk, answers):
            results[n] = {"line": n, **{k: obj.get(k) for k in ("image", "audio", "question")}, "answer": ans}
    text = "".join(json.dumps(results[n]) + "\n" for n, _, _ in requests)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    failed = sum(1 for r in results.values() if "error" in r)
    print(f"safe infer: answered {len(results) - failed} of {len(results)} lines, {failed} failed"
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 1 if failed else 0


__all__ = ["evaluate_checkpoint", "infer_main", "load_checkpoint", "locate_checkpoint", "resolve_base",
           "resolve_device", "OriginalModel", "MemoryFeatureCache", "caption_retrieval", "InputError",
           "LoadedCheckpoint", "CheckpointFiles", "REQUEST_FIELDS", "unknown_fields_error"]
