"""From records on disk to model batches: loading, skip-and-count, and a resumable batch stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from safe_av.config import DataConfig, SAFEConfig
from safe_av.data.audio import load_audio, warn_truncated
from safe_av.data.formats import read as read_format
from safe_av.data.records import DataError, Sample
from safe_av.data.sampling import CurriculumBatchSampler
from safe_av.data.vision import augment_image, load_image

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Samples of several datasets for one split, and what the readers rejected."""

    samples: list[Sample] = field(default_factory=list)
    bad: list = field(default_factory=list)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    """Entries left out on purpose, per dataset and reason: the readers' (``question_deleted``, ``answer
    undisclosed``, ...) and ``no answers`` (a split without published annotations: nothing to train or score)."""

    def of(self, *datasets: str) -> list[Sample]:
        return [s for s in self.samples if s.dataset in datasets]

    def add(self, other: "Corpus") -> None:
        self.samples += other.samples
        self.bad += other.bad
        for name, counts in other.skipped.items():
            mine = self.skipped.setdefault(name, {})
            for reason, n in counts.items():
                mine[reason] = mine.get(reason, 0) + n


def read_corpus(cfg: DataConfig, datasets: list[str], split: str | dict[str, str]) -> Corpus:
    """Read ``split`` (one for all, or per dataset name) of each dataset from ``cfg.root/<dataset>`` (layouts in
    the README). Questions without answers are left out and counted (``Corpus.skipped``)."""
    corpus = Corpus()
    for name in dict.fromkeys(datasets):
        result = read_format(name, Path(cfg.root) / name, split[name] if isinstance(split, dict) else split)
        answered = [s for s in result.samples if s.answers]
        corpus.samples.extend(answered)
        corpus.bad.extend(result.bad)
        counts = dict(result.skipped)
        if len(answered) < len(result.samples):
            counts["no answers"] = len(result.samples) - len(answered)
            log.warning("%s: %d of %d entries have no answers (annotations not published for this split?) and are "
                        "left out", name, counts["no answers"], len(result.samples))
        if counts:
            corpus.skipped[name] = counts
        for bad in result.bad:
            log.warning("skipped annotation: %s", bad)
    return corpus


def eval_datasets(cfg: SAFEConfig) -> list[str]:
    """The datasets the training's evaluations read: the VQA set always (VL retention), the AVQA set when a phase
    trains on it."""
    names = {d for p in cfg.train.phases for d in p.datasets} | {cfg.data.vqa_dataset}
    return sorted({cfg.data.vqa_dataset, cfg.data.avqa_dataset} & names | {cfg.data.vqa_dataset})


def final_splits(cfg: DataConfig, datasets: list[str]) -> dict[str, str]:
    """The split each dataset's final metrics are measured on (:meth:`DataConfig.final_split`)."""
    return {d: cfg.final_split(d) for d in datasets}


def read_eval_corpora(cfg: SAFEConfig) -> tuple[Corpus, Corpus]:
    """(selection corpus, final-evaluation corpus): ``data.select_split`` and the final splits
    (:func:`final_splits`) of :func:`eval_datasets`."""
    names = eval_datasets(cfg)
    for key, what in (("select_split", "the evaluations during training"), ("eval_split", "the final AVQA metrics"),
                      ("vqa_eval_split", "the final VQA metrics")):
        if getattr(cfg.data, key) in ("train", "development"):  # development: Clotho's name for train
            log.warning("data.%s=%r is a training split: %s measure what was trained on", key,
                        getattr(cfg.data, key), what)
    try:
        select = read_corpus(cfg.data, names, cfg.data.select_split)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.select_split={cfg.data.select_split!r}: {err}") from err
    splits = final_splits(cfg.data, names)
    final = Corpus()
    for name in names:
        key = "data." + cfg.data.final_split_key(name)
        if splits[name] == cfg.data.select_split:  # read once: the same files (their bad entries counted once)
            final.samples += select.of(name)
            if name in select.skipped:
                final.skipped[name] = dict(select.skipped[name])
            continue
        try:
            part = read_corpus(cfg.data, [name], splits[name])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{key}={splits[name]!r}: {err}") from err
        final.add(part)
    return select, final


def sample_group(sample: Sample) -> tuple[str, str]:
    """What questions share: the video (its audio file) or the image; the question itself without either. Held-out
    selection removes whole groups from the final metrics, so no image or clip evaluated there was chosen on."""
    return sample.dataset, str(sample.audio or sample.image or sample.id)


@dataclass
class Selection:
    """The questions the training's own evaluations read (all from ``data.select_split``)."""

    vqa_subset: list[Sample]
    """VL retention is tracked on these (curriculum stage evaluations, phases that train the base)."""
    audio_pool: list[Sample]
    """Audio-dependent AVQA questions of every difficulty: the audio accuracy of phases outside the curriculum."""
    stage_pools: dict[str, list[Sample]]
    """Per curriculum stage: its difficulties' audio-dependent AVQA questions (empty without a curriculum)."""

    @property
    def avqa(self) -> list[Sample]:
        return self.audio_pool + [s for pool in self.stage_pools.values() for s in pool]


def selection(cfg: SAFEConfig, select: Corpus) -> Selection:
    """:class:`Selection` from the selection corpus: ``curriculum.eval_samples`` questions per set, in file order.
    The stage pools are drawn whether or not a phase runs the curriculum, so variants of one config (the
    reproduce ablations) leave out the same final questions."""
    from safe_av.eval.evaluate import is_audio_dependent  # safe_av.eval imports this module

    n = cfg.curriculum.eval_samples
    dep = [s for s in select.of(cfg.data.avqa_dataset) if is_audio_dependent(s.question_type)]
    pools = {st.name: [s for s in dep if s.difficulty in st.difficulties][:n] for st in cfg.curriculum.stages}
    return Selection(vqa_subset=select.of(cfg.data.vqa_dataset)[:n], audio_pool=dep[:n], stage_pools=pools)


def held_out(selection: list[Sample], report: list[Sample], *, same_split: bool) -> tuple[list[Sample], int]:
    """``report`` without the questions that share a group (:func:`sample_group`) with ``selection`` when both come
    from the same split; and how many were removed."""
    if not same_split or not selection:
        return report, 0
    used = {sample_group(s) for s in selection}
    kept = [s for s in report if sample_group(s) not in used]
    if report and not kept:
        log.warning("every one of the %d final-evaluation question(s) of %s shares an image or video with the "
                    "questions the training evaluates on (the same split): none is left to report. Use fewer "
                    "curriculum.eval_samples, or another data.select_split / final split", len(report),
                    report[0].dataset)
    return kept, len(report) - len(kept)


_WARNED: set[tuple[str, str]] = set()  # samples whose skip was logged at WARNING in this process


class SAFEDataset(Dataset):
    """Loads a sample's image and audio. A bad file is skipped (``None``) and counted by the collate.

    Bad files are those `load_image` / `load_audio` reject (missing, a directory, corrupt, empty, too short,
    silent, ...). An item with audio carries ``audio_truncated``: whether its clip was longer than
    ``max_seconds`` (the feature cache's own limit with a cache) and so cut to its start; the collate counts
    those rows in ``batch["audio_truncated"]``. Items without audio carry ``audio_truncated=False``.

    Augmentation draws from ``(seed, epoch, index)`` only, so a resumed run sees the same pixels.
    Cached audio features (``feature_cache``) replace the waveform when given.

    Logging: a skipped sample is logged once per process at WARNING (later at DEBUG) and a cut clip once per
    file and process. With DataLoader workers each worker is a process, and warnings come from the batches a
    worker loads - prefetched ones the consumer never uses included - so there can be more warnings than skips
    counted. The counts (``batch["skipped"]``, ``batch["audio_truncated"]``) are exact: they travel with the
    batches, and only consumed batches are summed by the training loop.
    """

    def __init__(self, samples: list[Sample], *, sampling_rate: int, max_seconds: float = 10.0,
                 augment: bool = False, seed: int = 0, feature_cache=None,
                 with_answers: bool = True):
        self.samples = samples
        self.sampling_rate = sampling_rate
        self.max_seconds = max_seconds
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.feature_cache = feature_cache
        self.with_answers = with_answers  # False: prompts only, for generation

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        s = self.samples[index]
        answer = s.answers[0] if (s.answers and self.with_answers) else None
        item = {"question": s.question, "answer": answer, "image": None, "audio_truncated": False,
                "meta": {"id": s.id, "dataset": s.dataset, "question_type": s.question_type,
                         "answers": list(s.answers), "difficulty": s.difficulty, "question": s.question}}
        try:
            if s.image is not None:
                img = load_image(s.image)
                if self.augment:
                    rng = np.random.default_rng([self.seed, self.epoch, index])
                    img = augment_image(img, s.question, rng, answers=s.answers)
                item["image"] = img
            if s.audio is not None:
                if self.feature_cache is not None:
                    item["audio_features"], cut = self.feature_cache.lookup(s.audio)
                    item["audio_truncated"] = self._cached_clip_cut(s.audio, cut)
                else:
                    clip = load_audio(s.audio, target_sr=self.sampling_rate, max_seconds=self.max_seconds)
                    item["waveform"], item["num_valid"] = clip.waveform, clip.num_valid
                    item["audio_truncated"] = clip.truncated
        except (DataError, KeyError) as err:  # KeyError: a file missing from the feature cache
            # once per sample and process at WARNING (evaluation reads each sample under several conditions);
            # every skip is still counted by the collate
            first = (s.dataset, s.id) not in _WARNED
            if first and len(_WARNED) < 100_000:
                _WARNED.add((s.dataset, s.id))
            log.log(logging.WARNING if first else logging.DEBUG, "skipped sample %s/%s: %s", s.dataset, s.id, err)
            return None
        except Exception as err:  # not a known data problem: stop, but name the sample and its files
            raise RuntimeError(f"loading sample {s.dataset}/{s.id} (image={s.image!r}, audio={s.audio!r}) failed: "
                               f"{type(err).__name__}: {err}") from err
        item["meta"]["audio_truncated"] = item["audio_truncated"]  # evaluation's records count it per question
        return item

    def _cached_clip_cut(self, path: str, duration: float | None) -> bool:
        """Whether the clip behind cached features was cut: ``duration`` is its full length when the cache encoded
        only its first ``max_seconds`` (as the cache recorded it: no file is opened per sample), else None. A cut
        clip is logged once per file like a clip `load_audio` cuts."""
        if duration is None:
            return False
        warn_truncated(path, duration, float(getattr(self.feature_cache, "max_seconds", self.max_seconds)))
        return True


class _Batches(torch.utils.data.Sampler):
    """The remaining batches of one sampler epoch, from a start position."""

    def __init__(self, batches: list[list[int]], start: int):
        self.batches, self.start = batches, start

    def __iter__(self):
        return iter(self.batches[self.start:])

    def __len__(self) -> int:
        return len(self.batches) - self.start


class BatchStream:
    """An endless, resumable stream of collated batches whose audio ratio / difficulties can change.

    Its state is ``(audio_ratio, difficulties, epoch, position)``; ``position`` counts batches the
    training loop has *consumed* (prefetched ones do not count), so a resume is exact.
    """

    def __init__(self, dataset: SAFEDataset, collate, *, batch_size: int, dataset_weights: dict[str, float] | None,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.weights, self.seed = batch_size, dataset_weights, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.audio_ratio, self.difficulties = 1.0, None
        self.requested: list[str] | None = None  # the difficulties asked for; ``difficulties``: those in effect
        self.epoch, self.position = 0, 0
        self._sampler = None
        self._iter = None

    def configure(self, audio_ratio: float, difficulties: list[str] | None) -> None:
        """Change the mix (a curriculum stage); the stream continues from a fresh epoch order."""
        diffs = sorted(difficulties) if difficulties else None
        # compared with what was asked, not with a fallback in effect: asking again for the same stage (a resume
        # re-applies its stage) is no change, and must not start a new epoch
        if self._sampler is not None and (audio_ratio, diffs) == (self.audio_ratio, self.requested):
            return
        self.audio_ratio, self.requested = audio_ratio, diffs
        if self._sampler is not None:  # a real change mid-run: next epoch of the new mix
            self.epoch, self.position = self.epoch + 1, 0
        self._build()

    def _build(self) -> None:
        self.difficulties = self.requested
        self._build_sampler()

    def _build_sampler(self) -> None:
        pools = {"audio": any(s.audio is not None for s in self.dataset.samples),
                 "other": any(s.audio is None for s in self.dataset.samples)}
        ratio = self.audio_ratio if pools["other"] else 1.0  # only audio-bearing data: every slot has audio
        ratio = ratio if pools["audio"] else 0.0
        if ratio != self.audio_ratio:
            log.warning("audio_ratio=%s cannot be drawn: this phase's data has %s; every batch gets audio_ratio=%s "
                        "(logged per step as audio_fraction)", self.audio_ratio,
                        "no audio-free sample" if ratio == 1.0 else "no audio", ratio)
        try:
            self._sampler = CurriculumBatchSampler(
                self.dataset.samples, batch_size=self.batch_size, audio_ratio=ratio,
                dataset_weights=self._present_weights(),
                difficulties=set(self.difficulties) if self.difficulties else None,
                seed=self.seed, rank=self.rank, world_size=self.world_size)
            empty = None
        except ValueError as err:  # a pool the filter emptied (e.g. no audio-free sample of these difficulties)
            if not self.difficulties:
                raise
            empty = err
        if (empty is not None or len(self._sampler) == 0) and self.difficulties:
            log.warning("no full batch of %d with audio_ratio=%s among difficulties %s%s: ignoring the difficulty "
                        "filter", self.batch_size, ratio, self.difficulties, f" ({empty})" if empty else "")
            self.difficulties = None
            return self._build_sampler()
        if len(self._sampler) == 0:
            raise ValueError(f"no full batch of {self.batch_size} can be drawn with audio_ratio={ratio} and "
                             f"difficulties={self.difficulties} from {len(self.dataset.samples)} samples")
        self._iter = None

    def _present_weights(self) -> dict[str, float] | None:
        if self.weights is None:
            return None
        present = {s.dataset for s in self.dataset.samples}
        return {k: v for k, v in self.weights.items() if k in present}

    def batches_per_epoch(self) -> int:
        if self._sampler is None:
            self._build()
        return len(self._sampler)

    def _loader(self):
        self.dataset.set_epoch(self.epoch)
        batches = self._sampler.epoch_batches(self.epoch)
        # A private generator: creating the iterator must not draw from the global RNG (which holds the
        # dropout stream), or a resumed run - which re-creates it mid-epoch - would drift.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        loader = DataLoader(self.dataset, batch_sampler=_Batches(batches, self.position), collate_fn=self.collate,
                            num_workers=self.num_workers, generator=generator)
        return iter(loader)

    def next(self) -> dict:
        if self._sampler is None:
            self._build()
        while True:
            if self._iter is None:
                self._iter = self._loader()
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch, self.position, self._iter = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch

    def state_dict(self) -> dict:
        return {"audio_ratio": self.audio_ratio, "difficulties": self.requested, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.audio_ratio, self.requested = state["audio_ratio"], state["difficulties"]
        self._build()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
