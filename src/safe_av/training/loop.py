"""The Stage A training loop, written out: setup -> phases (step, eval, curriculum, checkpoint) -> evaluation.

Distribution, mixed precision and tracking go through accelerate. Everything a resume needs is
in one ``TrainState`` plus the optimizer/scheduler/RNG states, saved atomically without pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from safe_av.config import ConfigError, PhaseConfig, SAFEConfig, config_to_yaml, to_dict
from safe_av.data.text import SAFEProcessor, move_batch
from safe_av.eval import evaluate as ev
from safe_av.flops import mfu, peak_flops, training_flops_per_step
from safe_av.models.build import build_audio_encoder, build_base, build_safe_model
from safe_av.models.presets import TINY_BASES
from safe_av.models.safe_model import SAFEModel
from safe_av.training import checkpoint as ckpt
from safe_av.training.curriculum import Curriculum, CurriculumStage
from safe_av.training.data import (BatchStream, Corpus, SAFEDataset, final_splits, held_out, read_corpus,
                                  read_eval_corpora, selection)
from safe_av.training.fisher import estimate_fisher, load_fisher, save_fisher
from safe_av.training.losses import LossWeights, composite_loss, distillation_loss, ewc_penalty, retention_loss
from safe_av.training.schedule import build_optimizer, build_scheduler, current_lrs

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides tensors that an exact resume needs (JSON)."""

    global_step: int = 0
    phase: int = 0
    phase_step: int = 0
    phase_steps: int | None = None
    """The current phase's length, fixed when it starts: an epoch-based phase's length depends on the curriculum
    stage then in force, so a resume (at a later stage) must not recompute it. None: a checkpoint from before."""
    phase_epochs: float | None = None
    """The ``epochs`` that length came from: a resume whose config changed them recomputes it."""
    stream: dict | None = None
    curriculum: dict | None = None
    skipped_samples: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    empty_in_a_row: int = 0
    truncated_audio: int = 0
    original_vqa_accuracy: float | None = None
    original_vqa_subset: float | None = None
    original_vqa_questions: str | None = None
    """Digest of the questions the two numbers above were measured on (a resume with other ones rescores)."""
    best: float | None = None
    phase_starts: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    pass


class DistributedSetupError(ValueError):
    """Several processes were launched but accelerate formed no process group (a usage error: exit 2)."""


class DataUnreadableError(ValueError):
    """Training steps in a row found no sample whose files could be loaded."""


#: optimizer steps (or Fisher batches) in a row without one loadable sample before training stops
EMPTY_STEPS_LIMIT = 10


def _check_empty_run(n: int, what: str, where: str) -> None:
    """Stop with a clear error once ``n`` (steps or batches) in a row had no loadable sample."""
    if n >= EMPTY_STEPS_LIMIT:
        raise DataUnreadableError(f"{what} in a row had no loadable sample {where}: their audio or image files "
                                  "cannot be read; the warnings above name them, `safe data validate` lists them all")


class Stopped(Exception):
    """Raised after the checkpoint of ``stop_after``: the run ends there as if killed."""


class Trainer:
    """Stage A: three phases, the curriculum, retention losses, checkpoints, evaluation."""

    def __init__(self, cfg: SAFEConfig, output_dir: str | Path, *, resume: str | None = None,
                 overwrite: bool = False, stop_after: int | None = None):
        """
        Args:
            cfg: the resolved config.
            output_dir: the run folder.
            resume: ``"latest"`` or a checkpoint folder.
            overwrite: a fresh :meth:`train` (no ``resume``) in a folder that holds an earlier run first removes
                that run's files (:data:`RUN_OUTPUTS`); without it such a folder is refused, so two runs'
                logs, checkpoints and Fisher never mix.
            stop_after: end the process's work right after the checkpoint of this global step, as a kill
                would (tests of exact resume).
        """
        self.cfg = cfg
        self.stop_after = stop_after
        self.out = Path(output_dir)
        if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = "latest"  # restarted by torchrun --max-restarts: pick up where we were
        self.resume = resume
        self.overwrite = overwrite
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)  # batches without audio skip the adapter
        trackers = [t for t in cfg.train.trackers if t in ("tensorboard", "wandb")]
        self.acc = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers or None,
                               project_dir=str(self.out), kwargs_handlers=[ddp])
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.acc.num_processes == 1:
            raise DistributedSetupError("launched as one of several processes (WORLD_SIZE > 1) but accelerate set "
                                        "up no distributed run: on CPU set ACCELERATE_USE_CPU=1 (see "
                                        "docs/distributed.md)")
        self.state = TrainState()
        self.t0 = time.time()

    # ================================================================== setup

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def _clear_previous_run(self) -> None:
        """A fresh run in a folder with an earlier run's outputs: remove them with ``overwrite``, else refuse
        (training would append to its ``metrics.jsonl``, reuse its ``fisher.safetensors`` and leave its
        checkpoints for a later ``--resume`` to pick up)."""
        found = previous_run_outputs(self.out)
        if found and not self.overwrite:
            raise RunFolderError(f"{self.out} already holds a training run ({', '.join(found)}): pass --resume to "
                                 f"continue it, --overwrite to replace it, or another --output-dir")
        # every rank looks before rank 0 deletes, and every rank meets the barrier after: a rank that looked after
        # the deletion found nothing, skipped the barrier and paired its next collective with the wrong one
        self.acc.wait_for_everyone()
        if found and self.main:
            log.warning("--overwrite: removing the earlier run's %s from %s", ", ".join(found), self.out)
            for name in found:
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.acc.wait_for_everyone()

    def _log_jsonl(self, record: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def setup(self) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.train.seed)
        if self.main:
            (self.out / "config.yaml").write_text(config_to_yaml(cfg))
        self._prepare_data()
        self._build_model()
        self._build_cache()
        if self.main and cfg.train.trackers:
            self.acc.init_trackers(TRACKER_PROJECT, config={"seed": cfg.train.seed})

    def _prepare_data(self) -> None:
        cfg = self.cfg
        if cfg.data.synthetic:
            if self.main:
                from safe_av.data.synthetic import ensure_synthetic

                ensure_synthetic(cfg.data)
            self.acc.wait_for_everyone()
        names = sorted({d for p in cfg.train.phases for d in p.datasets} | {cfg.data.vqa_dataset})
        self.train_corpus = read_corpus(cfg.data, names, "train")
        self.select_corpus, self.eval_corpus = read_eval_corpora(cfg)
        # once each: corpora that read the same split read the same files
        self.bad_annotations = len({str(b) for c in (self.train_corpus, self.select_corpus, self.eval_corpus)
                                    for b in c.bad})
        # entries left out on purpose (deleted questions, undisclosed answers, no answers), per corpus and dataset
        self.skipped_annotations = {k: c.skipped for k, c in (("train", self.train_corpus),
                                                               ("selection", self.select_corpus),
                                                               ("final", self.eval_corpus)) if c.skipped}

    def _build_model(self) -> None:
        cfg = self.cfg
        base_path = None
        if cfg.model.base in TINY_BASES and cfg.train.pretrain.enabled:
            from safe_av.training.pretrain import pretrain_tiny_base

            vl_train = [s for s in self.train_corpus.samples
                        if s.image is not None and (s.audio is None or image_question(s))]
            vocab = self.train_corpus.samples + self.select_corpus.samples  # never the split reported on
            if self.main:
                base_path = pretrain_tiny_base(cfg, vl_train, vocab, device=self.acc.device)
            self.acc.wait_for_everyone()
            base_path = pretrain_tiny_base(cfg, vl_train, vocab) if base_path is None else base_path
        self.base_path = base_path
        self.audio_path = None
        from safe_av.training.pretrain_audio import pretrain_tiny_audio, wants_audio_pretraining

        if wants_audio_pretraining(cfg):
            if self.main:
                self.audio_path = pretrain_tiny_audio(cfg, device=self.acc.device)
            self.acc.wait_for_everyone()
            self.audio_path = self.audio_path or pretrain_tiny_audio(cfg)
        base = build_base(cfg.model, base=str(base_path) if base_path else None)
        if cfg.train.mixed_precision == "fp16" and base.is_encoder_decoder:
            raise ConfigError("train.mixed_precision='fp16': refused for FlanT5 (T5 overflows in fp16); use bf16 or no")
        torch.manual_seed(cfg.train.seed)
        encoder = build_audio_encoder(cfg.model, path=str(self.audio_path) if self.audio_path else None)
        self.model: SAFEModel = build_safe_model(cfg.model, base=base, audio_encoder=encoder)
        self.model.to(self.acc.device)
        self.processor = SAFEProcessor.from_model(self.model, max_length=cfg.data.max_text_length)
        self.ddp_model = None

    # ================================================================== phases

    def _phase_parts(self, phase: PhaseConfig) -> dict:
        unfreeze = phase.unfreeze if "base" in phase.train else []
        return dict(projector="projector" in phase.train, fusion="fusion" in phase.train and self.model.fusion is not None,
                    unfreeze=unfreeze, lora="lora" in phase.train and self.model.lora_config is not None)

    def _start_phase(self, index: int):
        cfg, phase = self.cfg, self.cfg.train.phases[index]
        self.model.set_trainable(**self._phase_parts(phase))
        groups = []
        for part, names in self.model.parameter_groups().items():
            if not names:
                continue
            if part not in phase.lr:
                raise ConfigError(f"train.phases[{index}].lr: no learning rate for trained part {part!r}")
            params = dict(self.model.named_parameters())
            groups.append({"name": part, "params": [params[n] for n in names], "lr": phase.lr[part]})
        optim = build_optimizer(groups, weight_decay=cfg.train.optim.weight_decay, betas=tuple(cfg.train.optim.betas),
                                eps=cfg.train.optim.eps)
        train_samples = self._phase_samples(phase)
        dataset = SAFEDataset(train_samples, sampling_rate=self.processor.sampling_rate,
                              max_seconds=cfg.data.max_audio_seconds, augment=cfg.data.augment,
                              seed=cfg.train.seed + index, feature_cache=self._feature_cache())
        stream = BatchStream(dataset, self.processor.collate, batch_size=phase.batch_size,
                             dataset_weights=phase.datasets, seed=cfg.train.seed + 1000 * index,
                             rank=self.acc.process_index, world_size=self.acc.num_processes,
                             num_workers=cfg.data.num_workers)
        stage = self.curriculum.current if (phase.curriculum and self.curriculum) else None
        try:
            stream.configure(stage.audio_ratio if stage else phase.audio_ratio,
                             list(stage.difficulties) if stage else None)
        except ValueError as err:  # the sampler's message does not know the phase or its datasets
            raise ValueError(f"phase {phase.name!r} (datasets {sorted(phase.datasets)} under {cfg.data.root}): "
                             f"{err}") from None
        per_epoch = max(1, stream.batches_per_epoch() // cfg.train.optim.grad_accum)
        steps = phase.max_steps or max(1, math.ceil(phase.epochs * per_epoch))
        sched = build_scheduler(optim, warmup_steps=min(cfg.train.optim.warmup_steps, steps // 2),
                                steps_per_epoch=per_epoch, restart_epochs=cfg.train.optim.restart_epochs,
                                min_lr=cfg.train.optim.min_lr)
        # always wrapped, so a batch without audio behaves the same with one process or many. With fp16's
        # GradScaler the optimizer goes through accelerate even in one process: its wrapper drives the scaler (step,
        # update) and its clip_grad_norm_ unscales only the optimizers it prepared (unprepared, one fp16 process
        # clipped gradients still x65536). Otherwise one process keeps the bare optimizer: the wrapper would add
        # ~0.5 ms of Python to a demo step (bench/step_overhead.py) and do nothing.
        # accelerate keeps every optimizer and model it prepared, and its clip_grad_norm_ unscales all of them: the
        # earlier phases' are dropped first, or fp16 divided a parameter trained in several phases (the projector)
        # by the loss scale once per phase (free_memory: accelerate's own "between two trainings")
        self.acc.free_memory()
        if self.acc.num_processes > 1:
            model, optim = self.acc.prepare(_TouchAllTrainable(self.model), optim)
        else:
            model = _TouchAllTrainable(self.model)
            optim = self.acc.prepare_optimizer(optim) if self.acc.scaler is not None else optim
        self.ddp_model = model
        n_train = sum(p.numel() for p in self.model.trainable_parameters().values())
        log.info("phase %d (%s): %d steps, trainable %d parameters in %s", index + 1, phase.name, steps, n_train,
                 [g["name"] for g in groups])
        return optim, sched, stream, steps

    def _check_phases(self) -> None:
        """Every phase still to train has annotations for each of its datasets and a full batch of them: found
        now, not after the earlier phases have trained."""
        for phase in self.cfg.train.phases[self.state.phase:]:
            samples = self._phase_samples(phase)
            need = phase.batch_size * self.acc.num_processes
            if len(samples) < need:
                raise ValueError(f"phase {phase.name!r}: {len(samples)} training sample(s) in datasets "
                                 f"{sorted(phase.datasets)} under {self.cfg.data.root}, fewer than one batch "
                                 f"({phase.batch_size} x {self.acc.num_processes} process(es))")

    def _phase_samples(self, phase: PhaseConfig):
        missing = [d for d in phase.datasets if not self.train_corpus.of(d)]
        if missing:
            raise ValueError(f"phase {phase.name!r}: no training samples for datasets {missing} under "
                             f"{self.cfg.data.root}")
        return self.train_corpus.of(*phase.datasets)

    def _feature_cache(self):
        return self.cache

    def audio_paths(self) -> list[str]:
        """Every audio file training and its evaluations read (what the feature cache holds)."""
        return sorted({s.audio for c in (self.train_corpus, self.select_corpus, self.eval_corpus)
                       for s in c.samples if s.audio})

    def _build_cache(self) -> None:
        """Open the frozen-feature cache and encode the files it lacks (main process first)."""
        self.cache = None
        if not self.cfg.data.feature_cache:
            return
        from safe_av.data.cache import FeatureCache

        paths = self.audio_paths()
        if self.main:
            cache = FeatureCache.open(self.cfg.data.feature_cache, self.model, max_seconds=self.cfg.data.max_audio_seconds)
            stats = cache.build(self.model, paths)
            log.info("feature cache %s: %s", cache.dir, stats)
        self.acc.wait_for_everyone()
        self.cache = FeatureCache.open(self.cfg.data.feature_cache, self.model, max_seconds=self.cfg.data.max_audio_seconds)

    # ================================================================== losses

    def _weights(self, phase: PhaseConfig) -> LossWeights:
        lc = self.cfg.loss
        if lc.task_only:
            return LossWeights(alpha=1.0)
        if phase.curriculum and self.curriculum is not None:
            w = self.curriculum.effective_weights()
        else:
            w = LossWeights(lc.alpha, lc.beta, lc.gamma, lc.delta)
        return LossWeights(w.alpha, w.beta if lc.retention else 0.0, w.gamma if lc.distillation else 0.0,
                           w.delta if (lc.fisher and self.fisher) else 0.0)

    def _distill_rows(self, batch: dict) -> torch.Tensor:
        """Rows whose answer must not depend on audio: image questions (and, when base parts train, VL-only rows)."""
        image_q = torch.tensor([_image_question_meta(m) for m in batch["meta"]], device=batch["input_ids"].device)
        has_audio = batch["has_audio"]
        base_trains = bool(self.model.unfrozen) or self.model.lora_active  # idle LoRA is exactly the identity
        rows = image_q & batch["has_images"]
        # with a frozen base, VL-only rows are the teacher exactly: skip them
        return rows if base_trains else rows & has_audio

    def compute_loss(self, model, batch: dict, w: LossWeights) -> tuple[torch.Tensor, dict]:
        # the LM head only where a loss reads it: from the position before the first label (model.label_logits_only)
        start = self.model.logits_start(batch) if self.cfg.model.label_logits_only else None
        out = model(**batch, logits_from=start)
        parts = {"task": out.loss}
        rows = self._distill_rows(batch)
        if (w.beta > 0 or w.gamma > 0) and bool(rows.any()):
            # the teacher runs on the distilled rows only; rows keep their width, so positions still line up
            visual = out.visual_tokens
            if visual is not None:  # the student's visual tokens of the distilled rows (rows with an image)
                visual = visual[rows[batch["has_images"]]]
            teacher = self.model.teacher_forward(_select_rows(batch, rows), visual_tokens=visual, logits_from=start)
            mask = out.token_labels[rows] != -100
            if w.gamma > 0:
                parts["distill"] = distillation_loss(out.token_logits[rows], teacher.token_logits, mask,
                                                     temperature=self.cfg.loss.temperature)
            if w.beta > 0:
                parts["retention"] = retention_loss(out.token_hidden[rows], teacher.token_hidden, mask)
        if w.delta > 0 and self.fisher:
            params = {n: p for n, p in self.model.named_parameters() if n in self.fisher}
            parts["fisher"] = ewc_penalty(params, self.model.anchors, self.fisher)
        return composite_loss(parts, w), parts

    # ================================================================== fisher

    def _setup_fisher(self) -> None:
        """Diagonal Fisher of the base parameters any phase unfreezes, on VL batches, at θ*."""
        self.fisher = None
        lc = self.cfg.loss
        unfreeze = sorted({m for p in self.cfg.train.phases if "base" in p.train for m in p.unfreeze})
        if not lc.fisher or lc.task_only or not unfreeze:
            return
        path = Path(lc.fisher_path) if lc.fisher_path else self.out / "fisher.safetensors"
        self.model.set_trainable(projector=False, fusion=False, unfreeze=unfreeze)
        params = self.model.trainable_parameters()
        if path.is_file():
            fisher, _, meta = load_fisher(path, params=params)
            log.info("Fisher loaded from %s (%s)", path, meta)
        else:
            fisher = compute_fisher(self, params)
            if self.main:
                save_fisher(path, fisher, {n: self.model.anchors[n] for n in fisher}, {"batches": lc.fisher_batches})
        # the parameters' order, whether computed or loaded (a file lists its tensors by name): the mean below is a
        # float sum, and a different order changes its last bits - and an exact resume's weights
        fisher = {n: fisher[n] for n in params if n in fisher}
        if lc.fisher_normalize:
            mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp(min=1e-30)
            fisher = {n: f / mean for n, f in fisher.items()}
        self.fisher = {n: f.to(self.acc.device) for n, f in fisher.items()}

    # ================================================================== evaluation during training

    def _eval_subsets(self) -> None:
        """The questions the training's own evaluations read - selection, from ``data.select_split``: the VQA
        subset retention is tracked on, each curriculum stage's audio pool, the phase-3 audio pool - and those the
        final metrics are measured on (``data.vqa_eval_split``, ``data.eval_split``). Where a dataset's selection
        and final splits are the same, the final set leaves out every image and video the selection reads
        (``held_out``), so no reported number was chosen on."""
        cfg = self.cfg
        cap = cfg.eval.max_samples  # as `safe eval` applies it
        vqa_name, avqa_name = cfg.data.vqa_dataset, cfg.data.avqa_dataset
        chosen = selection(cfg, self.select_corpus)
        self.vqa_subset, self.audio_pool, self.stage_pools = chosen.vqa_subset, chosen.audio_pool, chosen.stage_pools
        splits = final_splits(cfg.data, [vqa_name, avqa_name])
        same = {d: splits[d] == cfg.data.select_split for d in splits}
        vqa, held_vqa = held_out(self.vqa_subset, self.eval_corpus.of(vqa_name), same_split=same[vqa_name])
        avqa, held_avqa = held_out(chosen.avqa, self.eval_corpus.of(avqa_name), same_split=same[avqa_name])
        self.vqa_eval, self.avqa_eval = vqa[:cap], avqa[:cap]
        self.eval_splits = {"vqa": splits[vqa_name], "avqa": splits[avqa_name], "selection": cfg.data.select_split}
        self.held_out = {"vqa": held_vqa, "avqa": held_avqa}
        for name, k in self.held_out.items():
            if k:
                log.info("final evaluation: %d %s question(s) of split %r left out: they share an image or video "
                         "with the questions the training evaluates on (data.select_split)", k, name,
                         self.eval_splits[name])

    def _predict(self, samples, *, model=None, **kw):
        # Side-effect free for training: a DataLoader draws its seed from torch's global generator, so without
        # the fork every evaluation (curriculum, retention) would move the random stream the training's dropout
        # and sampling read, and the same run evaluated at other steps would train differently.
        device = self.acc.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            return ev.predict(model if model is not None else self.model, self.processor, samples, batch_size=self.cfg.eval.batch_size,
                              max_new_tokens=self.cfg.eval.max_new_tokens,
                              max_seconds=self.cfg.data.max_audio_seconds, feature_cache=self.cache, **kw)

    def _retention(self) -> float | None:
        """VQA accuracy on the selection subset (``data.select_split``) over the original model's (None without VQA data)."""
        if not (self.vqa_subset and self.state.original_vqa_subset):
            return None
        score = ev.score_vqa(self._predict(self.vqa_subset))
        return None if score is None else score / self.state.original_vqa_subset

    def _score_original_vqa(self) -> None:
        """The untrained model's VQA accuracy on the final evaluation set and on the selection subset that retention
        is tracked on during training (the same questions as there: those of the subset whose image loads)."""
        from safe_av.eval.run import OriginalModel  # safe_av.eval.run imports this module

        # the original model as a view (LoRA off, unfrozen modules at their anchors): the same numbers before
        # the first step, and right after a resume onto other questions (another split or subset size)
        original = OriginalModel(self.model)
        self.state.original_vqa_accuracy = ev.score_vqa(self._predict(self.vqa_eval, model=original))
        self.state.original_vqa_subset = ev.score_vqa(self._predict(self.vqa_subset, model=original))
        self.state.original_vqa_questions = self._vqa_questions_digest()
        log.info("original VQA accuracy %s", self.state.original_vqa_accuracy)

    def _vqa_questions_digest(self) -> str:
        # splits and ids, not paths: a resume may read the same data from another root (data.root is free)
        ids = [[(s.dataset, s.id) for s in part] for part in (self.vqa_eval, self.vqa_subset)]
        return hashlib.sha256(json.dumps([self.eval_splits, ids]).encode()).hexdigest()[:16]

    def _stage_eval(self, stage: CurriculumStage) -> tuple[float | None, float | None]:
        """VL retention on the selection subset and the stage's audio accuracy (its difficulties, audio-dependent
        questions of ``data.select_split``)."""
        retention = self._retention()
        return retention, self._audio_accuracy(self.stage_pools.get(stage.name, []))

    def _audio_accuracy(self, pool) -> float | None:
        """Exact-match accuracy on ``pool``'s audio questions; None without any (or when every clip of the pool
        failed to load: each skip is logged)."""
        return ev.score_avqa(self._predict(pool) if pool else [])["overall"]

    # ================================================================== the loop

    def train(self) -> dict:
        if not self.resume:
            self._clear_previous_run()
        else:
            self._check_resume_config()
        self.setup()
        self._eval_subsets()
        self.curriculum = self._build_curriculum()
        start = self._maybe_resume_state()
        self._check_phases()  # before the Fisher pass, which can be long on a real model
        self._setup_fisher()
        self._audio_stats()
        if (self.state.original_vqa_accuracy is None
                or self.state.original_vqa_questions != self._vqa_questions_digest()):
            self._score_original_vqa()
        bar = tqdm(total=self.state.global_step, initial=self.state.global_step, disable=not self.main, desc="train", dynamic_ncols=True)
        for index in range(self.state.phase, len(self.cfg.train.phases)):
            self._run_phase(index, bar, resume_from=start if index == self.state.phase else None)
            start = None
        bar.close()
        return self.finish()

    def _run_phase(self, index: int, bar, resume_from: Path | None) -> None:
        cfg, st = self.cfg, self.state
        phase = cfg.train.phases[index]
        optim, sched, stream, steps = self._start_phase(index)
        self.phase_flops, self.peak_flops = self._phase_flops(index)
        if resume_from is not None:
            self._restore(resume_from, optim, sched, stream)
            # an epoch-based phase keeps the length it started with, unless the config changed its epochs (a
            # max_steps phase takes the config's count: nothing about it depends on the stage)
            if not phase.max_steps and st.phase_steps is not None and st.phase_epochs == phase.epochs:
                steps = st.phase_steps
        else:
            st.phase, st.phase_step, st.phase_steps, st.phase_epochs = index, 0, steps, phase.epochs
            st.phase_starts[str(index)] = st.global_step
            first_curriculum_phase = phase.curriculum and not any(p.curriculum for p in cfg.train.phases[:index])
            if first_curriculum_phase and self.curriculum is not None:
                self.curriculum.begin(st.global_step)  # its foundation stage starts here, not at step 0
            self._log_jsonl({"event": "phase_start", "step": st.global_step, "phase": index + 1, "name": phase.name,
                             "reason": f"phase {index + 1} ({phase.name}): trains {phase.train}"})
        bar.total = (bar.total or 0) + steps - st.phase_step
        bar.refresh()
        if phase.curriculum and self.curriculum is not None:
            stage = self.curriculum.current
            stream.configure(stage.audio_ratio, list(stage.difficulties))
        model = self.ddp_model
        model.train()
        while st.phase_step < steps:
            t_step = time.time()
            w = self._weights(phase)
            logs = self._optimizer_step(model, optim, sched, stream, w)
            st.phase_step += 1
            st.global_step += 1
            bar.update(1)
            if logs is not None:
                n, n_tok, lrs = logs.pop("_samples"), logs.pop("_tokens"), logs.pop("_lrs")
                dt = max(time.time() - t_step, 1e-9)
                if self.phase_flops is not None:
                    logs["mfu"] = mfu(self.phase_flops, dt, self.peak_flops)
                logs.update(step=st.global_step, phase=index + 1, stage=self._stage_index(phase),
                            # the run's throughput, estimated as this rank's count x the ranks (they step the same
                            # batch size; skipped samples and token counts differ a little between ranks)
                            audio_ratio=stream.audio_ratio, samples_per_s=n * self.acc.num_processes / dt,
                            tokens_per_s=n_tok * self.acc.num_processes / dt,
                            peak_memory_mb=_peak_memory_mb(), **{f"weights/{k}": v for k, v in asdict(w).items()},
                            **lrs)
                drift = self._param_drift()
                if drift is not None:
                    logs["param_drift"] = drift
                if self.curriculum is not None and phase.curriculum:
                    self.curriculum.observe_loss(st.global_step, logs["loss/total"])
                if st.global_step % cfg.train.log_every == 0 or st.phase_step == steps:
                    self._log_jsonl(logs)
                    if cfg.train.trackers:
                        self.acc.log({k: v for k, v in logs.items() if isinstance(v, (int, float))},
                                     step=st.global_step)
                    bar.set_postfix(loss=f"{logs['loss/total']:.3f}", stage=logs["stage"])
            if phase.curriculum and self.curriculum is not None:
                self._curriculum_tick(stream)
            elif self.model.base_trains and st.global_step % cfg.curriculum.eval_every == 0:
                self._retention_tick()
            if st.global_step % cfg.train.checkpoint_every == 0 or st.phase_step == steps:
                self._save(optim, sched, stream)
                self.acc.wait_for_everyone()  # no rank goes on (or stops) before rank 0's checkpoint is complete
            if self.stop_after is not None and st.global_step >= self.stop_after:
                raise Stopped(st.global_step)

    def _optimizer_step(self, model, optim, sched, stream: BatchStream, w: LossWeights) -> dict | None:
        """One optimizer step over ``grad_accum`` micro-batches; non-finite losses/grads skip the step."""
        cfg, st = self.cfg, self.state
        accum = cfg.train.optim.grad_accum
        # Loss parts stay on the device until the step ends: one host sync per optimizer step, not per part
        # and micro-batch. A non-finite micro-batch loss still gets its backward (its NaN/inf reaches the
        # gradient norm; with several processes every rank must run the same all-reduces) and skips the step.
        sums: dict[str, torch.Tensor] = {}
        n_samples, n_tokens, n_audio = 0, 0, 0
        finite_t = torch.ones((), dtype=torch.bool, device=self.acc.device)
        micro_batches = [stream.next() for _ in range(accum)]
        # A micro-batch empty on any rank (none of its samples loaded) is skipped on every rank, and the gradients
        # are all-reduced on the last one that is left: a rank without that backward would leave the others
        # waiting, and one whose synchronising micro-batch was skipped would step on its own gradient.
        local_tokens = [self._part_tokens(b, w) for b in micro_batches]
        empty, tokens = self._data_counts(micro_batches, local_tokens)
        live = [i for i, e in enumerate(empty) if not e]
        # Each loss part is a mean over its own tokens: the task loss over the answer tokens, distillation and
        # retention over those of the distilled rows. Each micro-batch's part is weighted by its share of that
        # part's tokens in the whole step (every live micro-batch of every rank, x the number of processes, as DDP
        # averages), so the step's gradient is the token mean one batch of them all would give: a micro-batch
        # where few samples loaded, or with short answers, no longer counts as much as a full one, and grad_accum
        # does not change the objective (tests/integration/test_training.py). The EWC penalty counts once a step.
        world = self.acc.num_processes
        step_total = [sum(tokens[i][k] for i in live) for k in (0, 1)]
        rank_total = [sum(local_tokens[i][k] for i in live) for k in (0, 1)]

        def shares(i: int, totals: list[int], scale: int) -> dict[str, float]:
            task, distilled = (local_tokens[i][k] * scale / totals[k] if totals[k] else 0.0 for k in (0, 1))
            return {"task": task if totals[0] else 1 / len(live), "distill": distilled, "retention": distilled,
                    "fisher": 1 / len(live)}

        for j, i in enumerate(live):
            share, log_share = shares(i, step_total, world), shares(i, rank_total, 1)  # log: this rank's means
            batch = micro_batches[i]
            n_samples += batch["input_ids"].shape[0]
            n_audio += int(batch["has_audio"].sum())
            n_tokens += int(batch["attention_mask"].sum())  # on the host, before the move
            batch = move_batch(batch, self.acc.device)
            sync = j == len(live) - 1 or world == 1
            ctx = self.acc.no_sync(model) if not sync else _null()
            with ctx, self.acc.autocast():
                loss, parts = self.compute_loss(model, batch, w)
            finite_t = finite_t & torch.isfinite(loss.detach())
            self.acc.backward(composite_loss({k: v * share[k] for k, v in parts.items()}, w))
            for k, v in parts.items():
                v = v.detach().float() * log_share[k]
                sums[f"loss/{k}"] = sums[f"loss/{k}"] + v if f"loss/{k}" in sums else v
        if sums:  # this rank's composite of its token means (one micro-batch: exactly compute_loss's total)
            sums["loss/total"] = composite_loss({k.removeprefix("loss/"): v for k, v in sums.items()}, w)
        if not sums:  # no micro-batch had a loadable sample: nothing to learn from
            return self._skip_empty_step(optim, sched)
        st.empty_in_a_row = 0
        if self.acc.num_processes > 1:  # one rank's non-finite loss skips the step on all of them
            finite_t = self.acc.gather(finite_t.reshape(1).float()).min() > 0
        params = [p for group in optim.param_groups for p in group["params"]]  # the trained ones, no model walk
        grad_norm = torch.as_tensor(self.acc.clip_grad_norm_(params, cfg.train.optim.grad_clip), device=self.acc.device)
        host = torch.stack([finite_t.float(), grad_norm.float(), *sums.values()]).tolist()  # the one sync
        finite = host[0] > 0
        grad_norm = host[1]
        totals: dict[str, float] = dict(zip(sums, host[2:]))
        scaler = self.acc.scaler  # fp16's GradScaler (None otherwise)
        if not finite or not math.isfinite(grad_norm):
            # fp16: an overflowing gradient is how the scaler finds its scale; its step skips the update and lowers
            # the scale (without it the scale never fell, and the next unscale_ raised). Only a loss that is itself
            # non-finite, or overflow at a scale below 1, counts toward train.max_nonfinite.
            overflow = scaler is not None and finite
            if scaler is not None:
                optim.step()
            optim.zero_grad(set_to_none=True)
            st.skipped_steps += 1
            if not overflow or scaler.get_scale() < 1.0:
                st.nonfinite_in_a_row += 1
            reason = ("non-finite loss" if not finite else
                      f"fp16 gradient overflow (loss scale lowered to {scaler.get_scale():g})" if overflow else
                      "non-finite gradient norm")
            self._log_jsonl({"event": "skipped_step", "step": st.global_step + 1, "reason": reason})
            if st.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                raise NonFiniteError(f"{st.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                     f"gradient (train.max_nonfinite={cfg.train.max_nonfinite}); stopping. Lower "
                                     "the learning rates, or use bf16 instead of fp16.")
            sched.step()
            return None
        st.nonfinite_in_a_row = 0
        totals["_lrs"] = current_lrs(optim)  # the rates this update uses (the scheduler moves on below)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        totals["grad_norm"] = grad_norm
        totals["_samples"], totals["_tokens"] = n_samples, n_tokens
        totals["audio_fraction"] = n_audio / max(n_samples, 1)  # what the step's batches held (this rank)
        return totals

    def _part_tokens(self, batch: dict, w: LossWeights) -> tuple[int, int]:
        """(answer tokens, answer tokens of the distilled rows) of a micro-batch: what its task loss and its
        distillation / retention losses average over (labels not -100; a decoder-only LM's first column never
        holds one, so the count is the same after the shift). (0, 0) for an empty micro-batch."""
        if batch.get("empty") or batch.get("labels") is None:
            return 0, 0
        answer = batch["labels"] != -100
        distilled = int(answer[self._distill_rows(batch)].sum()) if (w.beta > 0 or w.gamma > 0) else 0
        return int(answer.sum()), distilled

    def _data_counts(self, micro_batches: list[dict], tokens: list[tuple[int, int]]) \
            -> tuple[list[bool], list[tuple[int, int]]]:
        """Per micro-batch, whether it is empty on this rank or any other, and its token counts (``tokens``: this
        rank's, from :meth:`_part_tokens`) summed over the ranks; adds the step's skipped samples and truncated clips of all ranks to the state (one small all-reduce
        with several processes, so every rank holds the same counts and any rank's checkpoint state is the run's)."""
        n = len(micro_batches)
        values = [float(bool(b.get("empty"))) for b in micro_batches]
        values += [float(t) for pair in tokens for t in pair]
        values += [float(sum(int(b.get("skipped", 0)) for b in micro_batches)),
                   float(sum(int(b.get("audio_truncated", 0)) for b in micro_batches))]
        if self.acc.num_processes > 1:
            values = self.acc.reduce(torch.tensor(values, device=self.acc.device), reduction="sum").tolist()
        self.state.skipped_samples += int(values[-2])
        self.state.truncated_audio += int(values[-1])
        return [v > 0 for v in values[:n]], [(int(values[n + 2 * i]), int(values[n + 2 * i + 1])) for i in range(n)]

    def _skip_empty_step(self, optim, sched) -> None:
        """An optimizer step none of whose micro-batches had a loadable sample: skipped and counted as such; a
        run of them means the phase's data cannot be read, which stops training with a clear error."""
        st = self.state
        optim.zero_grad(set_to_none=True)
        st.skipped_steps += 1
        st.empty_in_a_row += 1
        self._log_jsonl({"event": "skipped_step", "step": st.global_step + 1,
                         "reason": "no sample of the batch could be loaded (see the skipped-sample warnings)"})
        phase = self.cfg.train.phases[st.phase]
        _check_empty_run(st.empty_in_a_row, f"phase {phase.name!r}: {st.empty_in_a_row} optimizer steps",
                         f"({st.skipped_samples} samples skipped so far) from datasets {sorted(phase.datasets)} "
                         f"under {self.cfg.data.root}")
        sched.step()
        return None

    def _phase_flops(self, index: int) -> tuple[float | None, float | None]:
        """Model FLOPs of one optimizer step of this phase and the device's peak (MFU; GPUs with a known peak)."""
        if not torch.cuda.is_available():
            return None, None
        peak = peak_flops(torch.cuda.get_device_name())
        if peak is None:
            return None, None
        try:
            return training_flops_per_step(self.cfg, phase=index).total / self.acc.num_processes, peak
        except Exception as err:  # an estimate must never stop training
            log.warning("FLOP estimate unavailable: %s", err)
            return None, None

    def _stage_index(self, phase: PhaseConfig) -> int | None:
        if not (phase.curriculum and self.curriculum is not None):
            return None
        return self.curriculum.index + 1

    def _curriculum_tick(self, stream: BatchStream) -> None:
        st, cc = self.state, self.cfg.curriculum
        before = self.curriculum.current
        retention = audio = None
        if st.global_step % cc.eval_every == 0:
            retention, audio = self._stage_eval(before)
            st.last_eval = {"eval/vl_retention": retention, "eval/stage_audio_accuracy": audio}
            self._log_jsonl({"step": st.global_step, **st.last_eval, "stage": before.name})
        for event in self.curriculum.update(st.global_step, retention=retention, audio_accuracy=audio):
            self._log_jsonl(event.to_record())
            log.info("curriculum: %s", event.reason)
        if self.acc.num_processes > 1:  # rank 0 decides (each rank's loss window holds its own losses): all follow
            from accelerate.utils import broadcast_object_list

            shared = broadcast_object_list([self.curriculum.state_dict()], from_process=0)
            self.curriculum.load_state_dict(shared[0])
        now = self.curriculum.current
        if now is not before:
            stream.configure(now.audio_ratio, list(now.difficulties))

    def _retention_tick(self) -> None:
        """VL retention and audio accuracy (selection split) during a phase that trains part of the base (LoRA, an unfrozen
        module) outside the curriculum: where the VL ability is at risk, the report's curves go on. The audio
        accuracy is on the selection split's audio-dependent questions of every difficulty.
        Logged only: neither drives the curriculum or ``train.best_metric`` here."""
        retention = self._retention()
        audio = self._audio_accuracy(self.audio_pool)
        record = {"eval/vl_retention": retention, "eval/stage_audio_accuracy": audio}
        record = {k: v for k, v in record.items() if v is not None}
        if record:
            self._log_jsonl({"step": self.state.global_step, **record})

    def _param_drift(self) -> float | None:
        if not self.model.anchors:
            return None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            sq = sum(float((params[n].float() - a.float()).pow(2).sum()) for n, a in self.model.anchors.items())
        return math.sqrt(sq)

    @torch.no_grad()
    def _audio_stats(self, max_clips: int = 256) -> None:
        """Standardise the projector's input with the training clips' feature statistics (``model.projector.standardize``)."""
        if not self.cfg.model.projector.standardize:
            return
        paths = sorted({s.audio for s in self.train_corpus.samples if s.audio})[:max_clips]
        if not paths:
            return
        if self.cache is not None:
            feats = [self.cache.get(p) for p in paths if p in self.cache]
        else:
            from safe_av.data.cache import encode_files

            feats = [f for _, f in encode_files(self.model, paths, max_seconds=self.cfg.data.max_audio_seconds)
                     if torch.is_tensor(f)]
        if feats:
            self.model.projector.set_input_stats(torch.stack(feats).to(self.acc.device))
            log.info("projector input standardised with the features of %d training clips", len(feats))

    def _build_curriculum(self) -> Curriculum | None:
        cc = self.cfg.curriculum
        if not cc.enabled or not any(p.curriculum for p in self.cfg.train.phases):
            return None
        stages = [CurriculumStage(s.name, s.audio_ratio, tuple(s.difficulties),
                                  LossWeights(s.alpha, s.beta, s.gamma, s.delta), cc.max_stage_steps,
                                  cc.min_stage_steps) for s in cc.stages]
        return Curriculum(stages, retention_threshold=cc.retention_threshold,
                          audio_acc_threshold=cc.audio_accuracy_threshold, loss_cv_threshold=cc.loss_cv_threshold,
                          loss_window=cc.loss_window, adaptive=cc.adaptive, compound=cc.adaptive_compound,
                          max_multiplier=cc.adaptive_max_multiplier)

    # ================================================================== checkpoints

    def _save(self, optim, sched, stream: BatchStream) -> None:
        st = self.state
        st.stream = stream.state_dict()
        st.curriculum = self.curriculum.state_dict() if self.curriculum is not None else None
        rank_rng = None
        if self.acc.num_processes > 1:  # every rank's own RNG streams, so a restart continues each exactly
            from accelerate.utils import gather_object

            rank_rng = gather_object([ckpt.rng_state()])
        if not self.main:
            return
        scaler = self.acc.scaler.state_dict() if getattr(self.acc, "scaler", None) is not None else None
        ckpt.save_checkpoint(self.out, st.global_step, model_state=self.model.adapter_state_dict(), optimizer=optim,
                             scheduler=sched, scaler_state=scaler, train_state=asdict(st), rank_rng=rank_rng,
                             config_yaml=config_to_yaml(self.cfg), keep_last=self.cfg.train.keep_last,
                             best_metric=self._best_metric(), meta=self._checkpoint_meta())

    def _checkpoint_meta(self) -> dict:
        """What loading a checkpoint needs besides its tensors, as the final adapter records it: where the base
        and audio encoder are, their family/kind and weight fingerprints (computed once: the originals do not
        change)."""
        if getattr(self, "_meta", None) is None:
            self._meta = {**self._locations(), **self.model.adapter_identity()}
        return self._meta

    def _locations(self) -> dict:
        """Absolute folders of the base and audio encoder this run loaded (None: loaded by name)."""
        return {"base_path": str(Path(self.base_path).resolve()) if self.base_path else None,
                "audio_encoder_path": str(Path(self.audio_path).resolve()) if self.audio_path else None}

    def _best_metric(self):
        """``(name, value, "max")`` of ``train.best_metric`` from the latest evaluation, if it measured it."""
        value = self.state.last_eval.get(self.cfg.train.best_metric)
        return None if value is None else (self.cfg.train.best_metric, float(value), "max")

    def _check_resume_config(self) -> None:
        """Compare the config with the one the checkpoint to resume was trained with, before anything is
        written: a changed ``model`` section is refused (the adapter's tensors would not fit it, or would mean
        something else) except :data:`RESUME_RUNTIME` keys; other changes are logged as a warning, naming each
        key (the run then differs from
        an uninterrupted one), except :data:`RESUME_FREE` (where files are, how the run reports)."""
        path = ckpt.find_latest(self.out) if self.resume == "latest" else Path(self.resume)
        if path is None or not (path / "config.yaml").is_file():
            return
        from safe_av.config import load_config

        try:  # through the loader, so keys added since with their defaults are no change
            old = to_dict(load_config(path / "config.yaml"))
        except (ConfigError, ValueError) as err:
            log.warning("--resume %s: its config.yaml cannot be compared (%s)", path, err)
            return
        changes = [c for c in config_changes(old, to_dict(self.cfg)) if not c[0].startswith(RESUME_FREE)]
        model = [c for c in changes if c[0].startswith("model.") and not c[0].startswith(RESUME_RUNTIME)]
        show = lambda cs: "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in cs)  # noqa: E731
        if model:
            raise ResumeConfigError(
                f"--resume {path}: the checkpoint was trained with another model section ({show(model)}); resume "
                f"with its config (--config {path / 'config.yaml'}), or start a fresh run")
        if changes:
            log.warning("--resume %s: config differs from the checkpoint's (%s); the run will differ from an "
                        "uninterrupted one", path, show(changes))

    def _maybe_resume_state(self) -> Path | None:
        if not self.resume:
            return None
        path = ckpt.find_latest(self.out) if self.resume == "latest" else Path(self.resume)
        if path is None:
            log.info("resume=latest: no checkpoint in %s, starting fresh", self.out)
            if self.main:  # what a run that died before its first checkpoint logged: not appended to again
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            return None
        _, _, train_state = ckpt.load_checkpoint(path, optimizer=None, scheduler=None, restore_rng=False)
        self.state = TrainState(**train_state)
        if self.curriculum is not None and self.state.curriculum:
            self.curriculum.load_state_dict(self.state.curriculum)
        if self.main:
            _truncate_jsonl(self.out / "metrics.jsonl", self.state.global_step, self.state.phase)
            dropped = ckpt.drop_after(self.out, self.state.global_step)
            if dropped:
                log.warning("--resume %s: removed the %d later checkpoint(s) of the run it abandons (%s), as its "
                            "metrics.jsonl is cut there", path, len(dropped), ", ".join(p.name for p in dropped))
        log.info("resuming from %s (step %d, phase %d)", path, self.state.global_step, self.state.phase + 1)
        return path

    def _restore(self, path: Path, optim, sched, stream: BatchStream) -> None:
        model_state, scaler_state, _ = ckpt.load_checkpoint(path, optimizer=optim, scheduler=sched,
                                                            rank=self.acc.process_index)
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in model_state.items():
                params[name].copy_(tensor)
        self.model.sync_lora_active()
        if scaler_state and getattr(self.acc, "scaler", None) is not None:
            self.acc.scaler.load_state_dict(scaler_state)
        if self.state.stream:
            stream.load_state_dict(self.state.stream)

    # ================================================================== the end

    def finish(self) -> dict:
        """Final evaluation, adapter, metrics.json and the report."""
        from safe_av.eval.run import json_safe

        st = self.state
        if self.main:  # first: an evaluation that fails must not cost the trained adapter
            self.model.save_pretrained(self.out / "adapter", extra_config={
                "base": self.cfg.model.base, "audio_encoder": self.cfg.model.audio_encoder, **self._locations(),
                "model": to_dict(self.cfg.model)})
        predictions = ev.PredictionLog()
        metrics = evaluate_run(self, predictions)
        metrics.update(curriculum_stages=self._stage_starts(), skipped_samples=st.skipped_samples,
                       skipped_steps=st.skipped_steps, truncated_audio=st.truncated_audio,
                       bad_annotations=self.bad_annotations, skipped_annotations=self.skipped_annotations,
                       steps=st.global_step,
                       phase_starts=st.phase_starts, train_seconds=round(time.time() - self.t0, 1))
        if self.main:
            (self.out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
            predictions.write(self.out / PREDICTIONS_FILE)  # per question: for error analysis and bootstrap CIs
            try:
                from safe_av.eval.report import write_report

                write_report(self.out)
            except Exception as err:  # the report must never cost a finished run
                log.warning("report failed: %s", err)
        self.acc.end_training()
        return metrics

    def _stage_starts(self) -> dict:
        return dict(self.curriculum.stage_start_steps) if self.curriculum is not None else {}


def evaluate_run(trainer: Trainer, predictions: ev.PredictionLog | None = None) -> dict:
    """The metrics ``metrics.json`` promises (see docs/interfaces.md). Each record behind them (one per question
    and condition) is kept in ``predictions`` when it is given."""
    t = trainer
    keep = (predictions if predictions is not None else ev.PredictionLog()).keep

    out: dict = {"original_vqa_accuracy": t.state.original_vqa_accuracy}
    counts: dict = {}
    if t.vqa_eval:
        recs = keep(t._predict(t.vqa_eval), "vqa", "safe")
        safe_vqa = ev.score_vqa(recs)  # sets each record's "score"
        counts["vqa"] = {"evaluated": len(recs), "skipped": len(t.vqa_eval) - len(recs),
                         "held_out": t.held_out["vqa"], "truncated_audio": ev.truncated(recs)}
        out["safe_vqa_accuracy"] = safe_vqa
        orig = t.state.original_vqa_accuracy
        out["vl_retention"] = safe_vqa / orig if (orig and safe_vqa is not None) else None
        out["feature_similarity"] = ev.feature_similarity(t.model, t.processor, ev.loaded(t.vqa_eval, recs)[:64])
    if t.avqa_eval:
        recs = keep(t._predict(t.avqa_eval), "avqa", "safe")
        # every condition and baseline on the questions whose files loaded, so they compare the same set
        kept = ev.loaded(t.avqa_eval, recs)
        counts["avqa"] = {"evaluated": len(kept), "skipped": len(t.avqa_eval) - len(kept),
                          "held_out": t.held_out["avqa"], "truncated_audio": ev.truncated(recs)}
        full = ev.score_avqa(recs)  # sets each record's "correct"
        masked = ev.score_avqa(keep(t._predict(kept, use_audio=False), "avqa", "audio_removed"))
        shuffled = ev.score_avqa(keep(t._predict(kept, shuffle_audio=True), "avqa", "audio_shuffled"))
        base = ev.chance_accuracy(t.train_corpus.of(t.cfg.data.avqa_dataset), kept)
        out.update(
            avqa_accuracy=full["overall"], avqa_accuracy_by_type=full["table"],
            audio_dependent_accuracy=full["audio_dependent"], temporal_accuracy=full["temporal"],
            audio_masked_avqa_accuracy=masked["overall"],
            audio_masked_audio_dependent_accuracy=masked["audio_dependent"],
            audio_shuffled_avqa_accuracy=shuffled["overall"],
            audio_shuffled_audio_dependent_accuracy=shuffled["audio_dependent"],
            avqa_chance_accuracy=base["chance"], avqa_majority_accuracy=base["majority"],
            audio_dependent_chance_accuracy=base["audio_dependent_chance"],
            audio_dependent_majority_accuracy=base["audio_dependent_majority"],
            # per official table row, on the same questions: the report compares each type with its own baselines
            audio_masked_avqa_accuracy_by_type=masked["table"], audio_shuffled_avqa_accuracy_by_type=shuffled["table"],
            avqa_chance_by_type=base["chance_by_type"], avqa_majority_by_type=base["majority_by_type"],
            avqa_n_by_type=base["n_by_type"],
        )
    out["eval_splits"] = dict(t.eval_splits)
    out["eval_samples"] = counts
    out["eval_skipped_samples"] = sum(c["skipped"] for c in counts.values())
    if out["eval_skipped_samples"]:
        log.warning("final evaluation: %s question(s) skipped because their files could not be loaded (%s)",
                    out["eval_skipped_samples"], ", ".join(f"{k}: {v['skipped']} of {v['evaluated'] + v['skipped']}"
                                                           for k, v in counts.items() if v["skipped"]))
    return out


def compute_fisher(trainer: Trainer, params: dict) -> dict:
    """Empirical diagonal Fisher on VL batches (image questions, no audio) at the current (original) weights."""
    cfg = trainer.cfg
    vl = [s for s in trainer.train_corpus.samples if s.image is not None and s.audio is None]
    if not vl:
        raise ValueError("Fisher: no VL-only (image, no audio) training samples to estimate it on")
    dataset = SAFEDataset(vl, sampling_rate=trainer.processor.sampling_rate, seed=cfg.train.seed)
    stream = BatchStream(dataset, trainer.processor.collate, batch_size=8, dataset_weights=None, seed=cfg.train.seed)
    stream.configure(0.0, None)

    def batches():  # batches none of whose images loaded are passed over (their skips are logged); a bounded number
        for _ in range(cfg.loss.fisher_batches):
            batch, empty = stream.next(), 0
            while batch.get("empty"):
                empty += 1
                _check_empty_run(empty, f"Fisher: {empty} batches of VL training samples",
                                 f"(datasets {sorted({s.dataset for s in vl})} under {cfg.data.root})")
                batch = stream.next()
            yield move_batch(batch, trainer.acc.device)

    return estimate_fisher(lambda b: trainer.model(**b).loss, params, batches(), max_batches=cfg.loss.fisher_batches)


def _select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The teacher's view of some rows of a batch: same width, no audio."""
    images = batch.get("images")
    return {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
            "labels": batch["labels"][rows], "has_images": batch["has_images"][rows],
            "images": images[rows[batch["has_images"]]] if images is not None else None,
            "has_audio": batch["has_audio"][rows]}


def image_question(sample) -> bool:
    """A sample whose question is answerable from the image alone."""
    return _image_question_meta({"question_type": sample.question_type, "dataset": sample.dataset})


def _image_question_meta(meta: dict) -> bool:
    """A question answerable from the image alone (VQA, MUSIC-AVQA Visual)."""
    qt = meta.get("question_type") or ""
    return meta.get("dataset") == "vqav2" or qt.split("/")[0] == "Visual"


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _truncate_jsonl(path: Path, step: int, phase: int | None = None) -> None:
    """Drop records logged after the checkpoint of ``step`` (in 0-based ``phase``) by a run that went on past it:
    later steps, and the start of a later phase at that same step (a checkpoint at a phase's last step is
    followed by the next phase's ``phase_start``, which the resumed run logs again)."""
    if not path.is_file():
        return

    def kept(record: dict) -> bool:
        if (record.get("step") or 0) > step:
            return False
        return not (phase is not None and record.get("event") == "phase_start"
                    and (record.get("phase") or 0) > phase + 1)

    keep = [line for line in path.read_text().splitlines() if line.strip() and kept(json.loads(line))]
    path.write_text("".join(line + "\n" for line in keep))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _TouchAllTrainable(torch.nn.Module):
    """What DDP wraps: the model, with ``0 x`` every trainable parameter added to its loss.

    A rank whose batch has no audio never calls the projector/fusion: in phases 1-2 its loss would then
    not require grad at all (backward fails) and the gradient all-reduce would not match the other ranks.
    The zero term gives every trainable parameter an exact zero gradient instead; values are unchanged.
    A batch with audio reaches every trainable part already, so it is added only to batches without
    audio (known on the host from the collated batch: no device sync, no extra ops on the usual step).
    """

    def __init__(self, model: SAFEModel):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        out = self.model(**batch)
        no_audio = batch.get("audio") is None and batch.get("audio_features") is None
        if out.loss is not None and (no_audio or batch.get("use_audio") is False):
            out.loss = out.loss + 0.0 * sum(p.sum() for p in self.model.parameters() if p.requires_grad)
        return out


def train(cfg: SAFEConfig, output_dir: str | Path, *, resume: str | None = None, overwrite: bool = False) -> dict:
    """``safe train``: run Stage A and return the final metrics."""
    return Trainer(cfg, output_dir, resume=resume, overwrite=overwrite).train()


TRACKER_PROJECT = "safe"  # accelerate's trackers write under RUN/<project>
# What a training run writes into its folder; `safe eval` outputs and anything else the user put there stay.
#: the final evaluation's records, one line per question and condition (as `safe eval`'s predictions file)
PREDICTIONS_FILE = "predictions.jsonl"
RUN_OUTPUTS = ("metrics.jsonl", "metrics.json", "report.html", "fisher.safetensors", "checkpoints", "adapter",
               "plots", TRACKER_PROJECT, PREDICTIONS_FILE)


#: config keys (dotted prefixes) a resume may change silently: where files are and how the run reports
RESUME_FREE = ("data.root", "data.feature_cache", "data.num_workers", "train.pretrain.cache_dir",
               "train.checkpoint_every", "train.keep_last", "train.log_every", "train.trackers", "eval.batch_size")


#: ``model`` keys a resume may change (with a warning): how the same tensors are computed or stored, not what
#: they are (e.g. gradient checkpointing after running out of memory)
RESUME_RUNTIME = ("model.dtype", "model.load_in", "model.gradient_checkpointing", "model.attn_implementation",
                  "model.frozen_prefix", "model.label_logits_only")


class ResumeConfigError(ValueError):
    """``safe train --resume`` with a config whose ``model`` section differs from the checkpoint's."""


def config_changes(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two config dicts (a key
    only one side has counts, with ``None`` on the other side; list entries by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += config_changes(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in config_changes(a, b, f"{path}.{i}")]
    return [] if old == new else [(path, old, new)]


class RunFolderError(ValueError):
    """``safe train`` into a folder that already holds a run, without ``--resume`` or ``--overwrite``."""


def previous_run_outputs(folder: Path) -> list[str]:
    """The entries of :data:`RUN_OUTPUTS` in ``folder`` (empty files and folders do not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if (path.is_file() and path.stat().st_size) or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


__all__ = ["Trainer", "TrainState", "train", "evaluate_run", "Corpus", "RunFolderError", "previous_run_outputs",
           "ResumeConfigError", "config_changes", "RESUME_FREE", "RESUME_RUNTIME"]
