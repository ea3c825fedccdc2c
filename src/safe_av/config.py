"""Typed configuration: nested dataclasses, merged ``defaults <- YAML <- CLI`` and validated.

Every field has a default, so a YAML file only names what it changes. An unknown key or a
value of the wrong type fails with a :class:`ConfigError` naming the dotted key path and value::

    cfg = load_config("configs/demo.yaml", overrides=["model.fusion.num_heads=4"])
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from safe_av.data.records import DATASETS  # the dataset formats safe_av.data.formats reads


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key path and the value."""


# ----------------------------------------------------------------------------- model


@dataclass
class ProjectorConfig:
    hidden_dim: int = 4096
    """Hidden width of the projector MLP (the spec's 4096). Input/output dims come from the models."""
    dropout: float = 0.1
    standardize: bool = False
    """Standardise the encoder features per channel with the training clips' mean/std (saved with the adapter)."""

    def __post_init__(self):
        _check(self.hidden_dim > 0, "hidden_dim", self.hidden_dim, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")


@dataclass
class FusionConfig:
    enabled: bool = True
    """False gives the 'simple concatenation' baseline: projector tokens only."""
    num_heads: int = 8
    ffn_mult: int = 4
    dropout: float = 0.1
    attend_text: bool = True
    """The fusion context holds the prompt's embeddings besides the visual tokens (question-aware audio)."""
    gate_scale: float = 1.0
    """Gates are tanh(gate_scale * g), starting at 0; > 1 opens them faster under Adam (see FusionLayer)."""

    def __post_init__(self):
        _check(self.num_heads > 0, "num_heads", self.num_heads, "must be > 0")
        _check(self.ffn_mult > 0, "ffn_mult", self.ffn_mult, "must be > 0")
        _check(self.gate_scale > 0, "gate_scale", self.gate_scale, "must be > 0")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        _check(self.r > 0, "r", self.r, "must be > 0")
        _check(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _check(bool(self.target_modules), "target_modules", self.target_modules, "must name at least one module")


@dataclass
class ModelConfig:
    base: str = "tiny-blip2-opt"
    """A preset name (``tiny-blip2-opt``, ``tiny-blip2-t5``, ``tiny-llava``), a hub name or a local path."""
    audio_encoder: str = "tiny-clap"
    """``tiny-clap``, ``tiny-whisper``, a hub name (laion/clap-htsat-unfused, openai/whisper-large-v3) or a path."""
    arch: str | None = None
    """Architecture file shipped in ``safe_av/presets`` (e.g. ``blip2-opt-2.7b``) used by ``safe info`` offline."""
    audio_arch: str | None = None
    num_audio_tokens: int = 8
    """Audio tokens per clip after masked temporal pooling of the encoder output."""
    audio_position: Literal["after_image", "before_answer"] = "after_image"
    """Where the audio tokens enter the LM input: after the image's tokens, or after the prompt (just before
    the answer, where a frozen decoder reads most directly)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the frozen base and encoder weights; trainable parts stay fp32."""
    load_in: Literal["none", "8bit", "4bit"] = "none"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    frozen_prefix: bool = True
    """While nothing in the base trains, run the positions before the first audio token without autograd
    (their keys/values cached for the rest): same outputs and gradients, no backward through the image
    tokens and none of their activations kept (decoder-only LMs without gradient checkpointing)."""
    label_logits_only: bool = True
    """The training step runs the LM head only from the position before the batch's first labelled token
    (decoder-only; the answer is at the end of every right-aligned row): the same losses, none of the
    (B, L, vocab) logits of the image and prompt positions (student and teacher)."""
    tiny_seed: int = 0

    def __post_init__(self):
        _check(self.num_audio_tokens > 0, "num_audio_tokens", self.num_audio_tokens, "must be > 0")


# ----------------------------------------------------------------------------- data


#: upper bound of ``data.max_audio_seconds``: clips are padded to it, so a huge value allocates without end
MAX_AUDIO_SECONDS = 600.0


@dataclass
class DataConfig:
    root: str = "runs/data/synthetic"
    """Folder holding one sub-folder per dataset (layouts in the README)."""
    synthetic: bool = False
    """Write the synthetic corpus to ``root`` when it is absent (the demo)."""
    synth_seed: int = 0
    synth_videos: int = 40
    """Synthetic MUSIC-AVQA videos (about 10 questions each)."""
    synth_vqa_images: int = 120
    synth_audio_clips: int = 48
    max_audio_seconds: float = 10.0
    max_text_length: int = 512
    num_workers: int = 0
    augment: bool = True
    """Image augmentation in training (random resized crop, colour jitter, side-safe flip)."""
    audio_augment: bool = False
    """Random audio augmentation (gain); refused together with the feature cache."""
    feature_cache: str | None = None
    """Folder of the frozen audio-feature cache (``safe data cache``); None computes features on line."""
    vqa_dataset: str = "vqav2"
    avqa_dataset: str = "musicavqa"
    caption_dataset: str | None = "audiocaps"
    eval_split: str = "test"
    """Split the final metrics are measured on (AVQA; ``safe eval``'s default for every set but VQA)."""
    vqa_eval_split: str = "val"
    """Split of ``vqa_dataset`` the final VL-retention metrics are measured on: VQA v2 publishes no test answers
    and the spec measures VQA accuracy on its validation set."""
    select_split: str = "val"
    """Split the training's own evaluations read: curriculum stage evaluations, retention tracking,
    ``train.best_metric``. Where it is also a final-metrics split (VQA v2's val by default) the images and videos
    those evaluations read are left out of the final metrics, so nothing training chose on is reported."""

    def final_split_key(self, dataset: str) -> str:
        """The key naming the split ``dataset``'s final metrics are measured on: ``vqa_eval_split`` for the VQA set,
        ``eval_split`` for the others."""
        return "vqa_eval_split" if dataset == self.vqa_dataset else "eval_split"

    def final_split(self, dataset: str) -> str:
        return getattr(self, self.final_split_key(dataset))

    def __post_init__(self):
        _check(0 < self.max_audio_seconds <= MAX_AUDIO_SECONDS, "max_audio_seconds", self.max_audio_seconds,
               f"must be in (0, {MAX_AUDIO_SECONDS:g}] (every clip is padded or cut to it; CLAP takes 10 s, Whisper "
               "30 s)")
        _check(0 < self.max_text_length <= 4096, "max_text_length", self.max_text_length, "must be in (0, 4096]")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _check(not (self.audio_augment and self.feature_cache), "audio_augment", self.audio_augment,
               "cannot be combined with data.feature_cache (cached features would not change per epoch)")
        for key in ("vqa_dataset", "avqa_dataset", "caption_dataset"):
            value = getattr(self, key)
            _check(value in DATASETS or (key == "caption_dataset" and not value), key, value,
                   f"must be one of {list(DATASETS)}" + (" (or \"\"/null: no captioning evaluation)"
                                                         if key == "caption_dataset" else ""))


# ----------------------------------------------------------------------------- training

PHASE_PARTS = ("projector", "fusion", "base", "lora")


@dataclass
class PhaseConfig:
    name: str = "phase"
    train: list[str] = field(default_factory=lambda: ["projector"])
    """Which parts train: any of projector, fusion, base (the modules in ``unfreeze``), lora."""
    lr: dict[str, float] = field(default_factory=lambda: {"projector": 1e-4})
    """Learning rate per trained part."""
    unfreeze: list[str] = field(default_factory=list)
    """Base sub-modules trained when ``base`` is in ``train`` (e.g. ``qformer``, ``language_projection``)."""
    datasets: dict[str, float] = field(default_factory=lambda: {"audiocaps": 1.0})
    """Dataset name -> sampling weight."""
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    curriculum: bool = False
    """Drive audio ratio, difficulty and loss weights from the curriculum in this phase."""
    audio_ratio: float = 1.0
    """Fraction of audio-bearing samples per batch when the curriculum is off."""

    def __post_init__(self):
        for part in self.train:
            _check(part in PHASE_PARTS, "train", part, f"must be one of {PHASE_PARTS}")
        for part, lr in self.lr.items():
            _check(part in PHASE_PARTS, f"lr.{part}", part, f"must be one of {PHASE_PARTS}")
            _check(lr > 0, f"lr.{part}", lr, "must be > 0")
        _check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "max_steps", self.max_steps, "must be > 0 (or null)")
        _check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check(0.0 <= self.audio_ratio <= 1.0, "audio_ratio", self.audio_ratio, "must be in [0, 1]")
        for name, weight in self.datasets.items():
            _check(name in DATASETS, f"datasets.{name}", name, f"unknown dataset; choose from {list(DATASETS)}")
            _check(weight >= 0, f"datasets.{name}", weight, "must be >= 0")


def _default_phases() -> list[PhaseConfig]:
    # The spec's "Multi-Phase Training Strategy".
    return [
        PhaseConfig("projector_warmup", ["projector"], {"projector": 1e-4}, [], {"audiocaps": 1.0}, 2, None, 32),
        PhaseConfig("fusion", ["projector", "fusion"], {"projector": 5e-5, "fusion": 1e-4}, [],
                    {"musicavqa": 1.0}, 3, None, 16, True),
        PhaseConfig("end_to_end", ["projector", "fusion"], {"projector": 1e-5, "fusion": 5e-6}, [],
                    {"musicavqa": 0.6, "audiocaps": 0.2, "vqav2": 0.2}, 3, None, 8, True),
    ]


@dataclass
class LossConfig:
    temperature: float = 3.0
    retention: bool = True
    distillation: bool = True
    fisher: bool = True
    fisher_batches: int = 16
    fisher_path: str | None = None
    """Precomputed Fisher (``safe fisher``); computed at the start of training when absent."""
    fisher_normalize: bool = True
    """Scale the Fisher to mean 1 over the trained parameters, so delta does not depend on its raw scale."""
    task_only: bool = False
    """Naive fine-tuning: task loss only (ignores retention/distillation/fisher)."""
    alpha: float = 1.0
    """Loss weights for phases without the curriculum (curriculum phases use the stage's weights)."""
    beta: float = 0.1
    gamma: float = 0.5
    delta: float = 0.1

    def __post_init__(self):
        _check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        for k in ("alpha", "beta", "gamma", "delta"):
            _check(getattr(self, k) >= 0, k, getattr(self, k), "must be >= 0")


@dataclass
class StageConfig:
    name: str = "stage"
    audio_ratio: float = 0.25
    difficulties: list[str] = field(default_factory=lambda: ["easy"])
    alpha: float = 1.0
    beta: float = 0.1
    gamma: float = 0.5
    delta: float = 0.1

    def __post_init__(self):
        _check(0.0 <= self.audio_ratio <= 1.0, "audio_ratio", self.audio_ratio, "must be in [0, 1]")
        for d in self.difficulties:
            _check(d in ("easy", "medium", "hard"), "difficulties", d, "must be easy, medium or hard")


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig("foundation", 0.25, ["easy"], 1.0, 0.1, 0.5, 0.1),
        StageConfig("development", 0.50, ["easy", "medium"], 1.0, 0.3, 0.7, 0.2),
        StageConfig("advanced", 0.75, ["medium", "hard"], 1.0, 0.5, 0.5, 0.3),
        StageConfig("mastery", 1.00, ["easy", "medium", "hard"], 1.0, 0.7, 0.3, 0.5),
    ]


@dataclass
class CurriculumConfig:
    enabled: bool = True
    stages: list[StageConfig] = field(default_factory=_default_stages)
    retention_threshold: float = 0.95
    audio_accuracy_threshold: float = 0.70
    loss_cv_threshold: float = 0.10
    loss_window: int = 20
    min_stage_steps: int = 10
    max_stage_steps: int = 1000
    eval_every: int = 50
    eval_samples: int = 64
    adaptive: bool = True
    adaptive_compound: bool = False
    """With ``adaptive``: multiply β by 1.5 / α by 1.2 again at every evaluation the condition still holds (the
    spec's literal reading, capped at ``adaptive_max_multiplier``), instead of once while it holds."""
    adaptive_max_multiplier: float = 4.0

    def __post_init__(self):
        _check(self.adaptive_max_multiplier >= 1.0, "adaptive_max_multiplier", self.adaptive_max_multiplier,
               "must be >= 1")


@dataclass
class OptimConfig:
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000
    restart_epochs: float = 2.0
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        _check(len(self.betas) == 2, "betas", self.betas, "must be two numbers")
        _check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class EncoderPretrainConfig:
    """Supervised pretraining of a *tiny* encoder on synthetic data of its own (what a real one brings)."""

    enabled: bool = False
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 4242

    def __post_init__(self):
        _check(self.epochs > 0, "epochs", self.epochs, "must be > 0")


@dataclass
class AudioPretrainConfig(EncoderPretrainConfig):
    """Trains a *tiny* audio encoder to hear the synthetic scenes first (what a real CLAP / Whisper brings)."""

    clips: int = 1000
    """Fresh synthetic scenes rendered for it (a corpus of its own, disjoint from SAFE's data)."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.clips >= self.batch_size, "clips", self.clips, "must be >= batch_size")


@dataclass
class VisionPretrainConfig(EncoderPretrainConfig):
    """Trains a *tiny* base's vision tower to see the synthetic frames first (what a real ViT / CLIP brings)."""

    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 777
    images: int = 2000
    """Fresh synthetic frames rendered for it (VQA-style shapes and instrument scenes, another seed)."""
    freeze: bool = True
    """Keep the pretrained tower frozen while the base then learns VQA (as BLIP-2 and LLaVA keep theirs)."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.images >= self.batch_size, "images", self.images, "must be >= batch_size")


@dataclass
class SoundTextPretrainConfig:
    """Teaches a *tiny* base's language model to answer audio questions from a description of the sound in
    words (what a real LLM brings; ``training/pretrain_sound_text.py``). It never hears audio."""

    enabled: bool = False
    scenes: int = 1500
    """Fresh synthetic scenes described for it (drawn with ``seed``, not SAFE's clips)."""
    held_out_scenes: int = 150
    share: float = 1.0
    """Described batches per VQA batch of the base pretraining (spread evenly among them)."""
    seed: int = 909

    def __post_init__(self):
        _check(self.scenes > 0, "scenes", self.scenes, "must be > 0")
        _check(self.held_out_scenes > 0, "held_out_scenes", self.held_out_scenes, "must be > 0")
        _check(0.0 < self.share <= 4.0, "share", self.share, "must be in (0, 4]")


@dataclass
class PretrainConfig:
    """Trains a *tiny* base VL model on the VQA set first, so it has VL ability worth keeping."""

    enabled: bool = False
    epochs: float = 10.0
    lr: float = 1e-3
    batch_size: int = 32
    cache_dir: str = "runs/cache/base"
    audio: AudioPretrainConfig = field(default_factory=AudioPretrainConfig)
    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    sound_text: SoundTextPretrainConfig = field(default_factory=SoundTextPretrainConfig)


@dataclass
class TrainConfig:
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    phases: list[PhaseConfig] = field(default_factory=_default_phases)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    checkpoint_every: int = 500
    keep_last: int = 3
    best_metric: str = "eval/stage_audio_accuracy"
    """Checkpoint kept as "best" (beside the last ``keep_last``): eval/stage_audio_accuracy or eval/vl_retention."""
    log_every: int = 10
    max_nonfinite: int = 5
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 8
    max_samples: int | None = None
    """At most this many questions per final evaluation set (the first ones left once the held-out images and videos
    are removed), in `safe eval` and a training run's final metrics; ``None``: all. The training's own evaluations
    use ``curriculum.eval_samples``."""

    def __post_init__(self):
        _check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        _check(self.max_samples is None or self.max_samples > 0, "max_samples", self.max_samples,
               "must be > 0 (or null: no cap)")


@dataclass
class SAFEConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- loading


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


# exponent notation without a dot, which YAML 1.2 reads as a float and PyYAML (YAML 1.1) as a string
_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` (from YAML) to type ``tp``, or raise naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}={value!r}: invalid")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}={value!r}: must be one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return from_dict(tp, value, path)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list")
        return [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return {_coerce(kt, k, f"{path}.{k}"): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3 and 3E4 as strings: accept them as numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(unknown_key(full, key, names))
        kwargs[key] = _coerce(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def unknown_key(full: str, key: Any, known) -> str:
    """The message for an unknown config key: where, the closest known key when one is near, and all of them."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{full}: unknown key{hint} (known: {', '.join(sorted(map(str, known)))})"


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")

    def index(node: list, i: int) -> int:  # keys[i] as a position in the list keys[:i] names
        k = keys[i]
        if not k.isdigit() or int(k) >= len(node):
            raise ConfigError(f"{dotted}: {'.'.join(keys[:i])} has {len(node)} entries "
                              f"(indices 0-{len(node) - 1}), got {k!r}")
        return int(k)

    node = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[index(node, i)]
            continue
        if k not in node or not isinstance(node[k], (dict, list)):
            node[k] = {}
        node = node[k]
    node[index(node, len(keys) - 1) if isinstance(node, list) else keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        try:
            _set_dotted(data, key.strip(), value)
        except ConfigError as err:
            raise ConfigError(f"--set {err}") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SAFEConfig:
    """Defaults <- YAML file <- ``key.path=value`` overrides; validated."""
    data: dict = to_dict(SAFEConfig())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = _yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") \
                from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        _merge_check(data, loaded, "", path)
        data = _deep_merge(data, loaded)
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    try:
        return from_dict(SAFEConfig, data)
    except ConfigError as e:
        # name where the bad value came from: an override (its key path as from_dict spells it) or the file
        keys = [re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", o.split("=", 1)[0].strip()) for o in overrides]
        msg = str(e)
        bad = re.split(r"[:=]", msg, maxsplit=1)[0].strip()  # the key path the message is about
        from_override = any(k == bad or k.startswith((bad + ".", bad + "[")) or bad.startswith((k + ".", k + "["))
                            for k in keys)
        where = "--set " if from_override else f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{msg}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently, so a
    second ``data:`` section would replace the first whole)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:  # the keys written here: a merge key's (``<<: *anchor``) may be overridden
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                break  # PyYAML's own construct_mapping reports it ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(err: "yaml.YAMLError") -> str:
    """PyYAML's message in one line, with the 1-based line and column where it has one."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def _merge_check(defaults: dict, loaded: dict, prefix: str, path: Path) -> None:
    for k in loaded:
        if isinstance(defaults, dict) and defaults and k not in defaults and not prefix.endswith(("lr", "datasets")):
            raise ConfigError(f"{path}: {unknown_key(prefix + str(k), k, defaults)}")


def _deep_merge(base: Any, new: Any) -> Any:
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            # dict-valued fields that are maps of user names (lr, datasets) replace rather than merge
            out[k] = _deep_merge(base[k], v) if k in base and k not in ("lr", "datasets") else v
        return out
    return new


def save_config(cfg: SAFEConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_to_yaml(cfg: SAFEConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
