"""Frozen audio-feature cache: the audio encoder's pooled tokens, computed once, read from disk.

The audio encoder is frozen, so its output for a given file never changes - unless the file,
the encoder, its feature extractor or the clip preprocessing change. Entries are keyed by the
file's content hash inside a namespace named by a fingerprint of all of those, so a changed
config never reads stale features::

    CACHE/<fingerprint>/config.json           what the fingerprint covers
    CACHE/<fingerprint>/index.json            content sha256 -> [shard, key]
    CACHE/<fingerprint>/bad.json              content sha256 -> why the file could not be encoded
    CACHE/<fingerprint>/truncated.json        content sha256 -> full duration of a clip cached from its start
    CACHE/<fingerprint>/shard-00000.safetensors

A file that cannot be decoded (corrupt, silent, too short ...) is skipped, counted, and its reason kept, so a
training or evaluation run that meets it later skips the sample with that reason (not "missing from the cache").
A path that cannot be opened (missing, a directory, no permission) is a `DataError` naming the file, counted as
``missing`` by `FeatureCache.build`. A clip longer than ``max_seconds`` is cached from its first ``max_seconds``
(as `load_audio` truncates it) and counted as ``truncated``.

Random audio augmentation would make features differ per epoch, so it is refused with a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from safe_av.data.audio import load_audio, path_problem
from safe_av.data.records import DataError

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model, max_seconds: float) -> dict:
    """Everything that determines a cached entry besides the file's bytes."""
    return {"encoder": model.audio_encoder.config_fingerprint(), "num_audio_tokens": model.num_audio_tokens,
            "max_seconds": max_seconds, "format": 3}


class CacheError(RuntimeError):
    """A damaged feature cache (a file of the cache itself, not a clip): the message names the file and how to
    rebuild. Not a `DataError`: the samples behind it are fine, so they are not skipped one by one."""


class FeatureCache:
    """Read/write access to one fingerprint namespace of a cache folder."""

    def __init__(self, folder: Path, fp: dict):
        self.fp = fp
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(folder) / digest
        self.index: dict[str, list] = self._read_json("index.json")
        self.bad: dict[str, str] = self._read_json("bad.json")
        # content sha256 -> duration (s) of a clip cached from its first max_seconds
        self.cut: dict[str, float] = self._read_json("truncated.json")
        self._hashes: dict[str, tuple] = {}
        self._shards: dict[str, object] = {}
        self.hits = self.misses = 0

    def _damaged(self, path: Path, what: str) -> CacheError:
        return CacheError(f"{path}: {what}: the feature cache is damaged; delete {self.dir} and run `safe data cache` "
                          "(or let training rebuild it)")

    def _read_json(self, name: str) -> dict:
        """One of the cache's JSON files as a dict ({} when it does not exist yet)."""
        path = self.dir / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._damaged(path, f"unreadable ({err})") from err
        if not isinstance(data, dict):
            raise self._damaged(path, f"expected a JSON object, found {type(data).__name__}")
        return data

    @classmethod
    def open(cls, folder: str | Path, model, *, max_seconds: float = 10.0) -> "FeatureCache":
        return cls(Path(folder), fingerprint(model, max_seconds))

    @property
    def max_seconds(self) -> float:
        """The clip length the cached features were computed from (longer clips were truncated)."""
        return float(self.fp["max_seconds"])

    def key(self, path: str | Path) -> str:
        """Content hash, memoised on (path, size, mtime).

        Raises:
            DataError: the path cannot be read as a file (`path_problem`'s error: missing, a directory, not a
                regular file, or the OSError's text).
        """
        try:
            st = os.stat(path)  # the one system call of a cache hit
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise path_problem(path) or DataError(path, "audio", str(path), "not a regular file")
        memo = self._hashes.get(str(path))
        if memo and memo[0] == (st.st_size, st.st_mtime_ns):
            return memo[1]
        try:
            digest = file_sha256(path)
        except OSError as err:
            raise DataError(path, "audio", str(path), f"cannot read the file ({err.strerror or err})") from err
        self._hashes[str(path)] = ((st.st_size, st.st_mtime_ns), digest)
        return digest

    def cut_duration(self, path: str | Path) -> float | None:
        """The full duration of ``path``'s clip when its cached features cover only its first ``max_seconds``
        (recorded by `build`: no file is opened), else None."""
        return self.cut.get(self.key(path))

    def _known_bad(self, path) -> bool:
        try:
            return self.key(path) in self.bad
        except DataError:
            return False

    def __contains__(self, path) -> bool:
        """Whether features of ``path`` are cached (False for a path that cannot be read)."""
        try:
            return self.key(path) in self.index
        except DataError:
            return False

    def get(self, path: str | Path) -> torch.Tensor:
        """(K, D_audio) features of ``path`` (see :meth:`lookup`)."""
        return self.lookup(path)[0]

    def lookup(self, path: str | Path) -> tuple[torch.Tensor, float | None]:
        """(K, D_audio) features of ``path`` and :meth:`cut_duration`'s value, from one :meth:`key` (one stat).

        Raises:
            DataError: the path cannot be read (see `key`), or `build` found the file unusable (its reason).
            KeyError: it was never cached.
        """
        key = self.key(path)
        if key not in self.index:
            self.misses += 1
            if key in self.bad:  # seen by build() and not decodable: say why, as loading it would
                raise DataError(path, "audio", str(path), self.bad[key])
            raise KeyError(f"{path}: not in the feature cache {self.dir} (run `safe data cache`)")
        shard, name = self.index[key]
        try:
            if shard not in self._shards:
                self._shards[shard] = safe_open(str(self.dir / shard), framework="pt")
            features = self._shards[shard].get_tensor(name)
        except (OSError, SafetensorError) as err:  # a shard deleted, cut short or overwritten since it was indexed
            raise self._damaged(self.dir / shard, f"cannot read tensor {name!r} of {path} ({err})") from err
        self.hits += 1
        return features, self.cut.get(key)

    def build(self, model, paths: list[str], *, batch_size: int = 8) -> dict:
        """Encode the files not cached yet (bad files are skipped and counted) and write one new shard.

        Returns:
            Counts: ``cached_before`` (entries already cached), ``new`` (encoded now), ``skipped`` (could not be
            decoded now: their reasons go to ``bad.json``), ``missing`` (paths that cannot be read as a file:
            absent, a directory, no permission), ``known_bad`` (distinct paths skipped by an earlier build),
            ``truncated`` (of those encoded now, clips longer than ``max_seconds``: cached from their start).
        """
        todo, seen, missing = [], set(), 0
        for p in paths:
            try:
                k = self.key(p)
            except DataError as err:
                missing += 1
                log.warning("feature cache: skipped %s", err)
                continue
            if k not in self.index and k not in self.bad and k not in seen:
                todo.append((p, k))
                seen.add(k)
        stats = {"cached_before": len(self.index), "new": 0, "skipped": 0, "missing": missing,
                 "known_bad": sum(1 for p in set(paths) if self._known_bad(p)), "truncated": 0}
        if not todo:
            return stats
        self.dir.mkdir(parents=True, exist_ok=True)
        key_of = dict((p, k) for p, k in todo)
        tensors: dict[str, torch.Tensor] = {}
        bad: dict[str, str] = {}
        truncated: dict[str, float] = {}
        for p, feat in encode_files(model, [p for p, _ in todo], max_seconds=self.fp["max_seconds"],
                                    batch_size=batch_size, truncated=truncated):
            if isinstance(feat, DataError):
                log.warning("feature cache: skipped %s", feat)
                stats["skipped"] += 1
                bad[key_of[p]] = feat.reason
            else:
                tensors[key_of[p]] = feat
        stats["truncated"] = len(truncated)
        self.cut.update({key_of[p]: duration for p, duration in truncated.items()})
        if bad:
            self.bad.update(bad)
            _write_json(self.dir / "bad.json", self.bad)
        if not tensors:
            return stats
        shard = f"shard-{len({s for s, _ in self.index.values()}):05d}.safetensors"
        tmp = self.dir / (shard + ".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(self.dir / shard)
        for k in tensors:
            self.index[k] = [shard, k]
        (self.dir / "config.json").write_text(json.dumps(self.fp, indent=1, default=str))
        _write_json(self.dir / "truncated.json", self.cut)
        _write_json(self.dir / "index.json", self.index)
        stats["new"] = len(tensors)
        return stats


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


@torch.no_grad()
def encode_files(model, paths: list[str], *, max_seconds: float, batch_size: int = 8,
                 truncated: dict[str, float] | None = None):
    """Yield ``(path, features)`` for each audio file - ``(K, D_audio)`` pooled encoder output on CPU - or
    ``(path, DataError)`` for a file that cannot be loaded (silent clips included). The one place the frozen
    encoder runs offline. A clip cut to ``max_seconds`` goes into ``truncated`` (path -> its full duration)
    when given."""
    enc = model.audio_encoder
    for start in range(0, len(paths), batch_size):
        names, waves, valid = [], [], []
        for p in paths[start:start + batch_size]:
            try:
                clip = load_audio(p, target_sr=enc.sampling_rate, max_seconds=max_seconds)
            except DataError as err:
                yield p, err
                continue
            if clip.truncated and truncated is not None:
                truncated[p] = clip.orig_duration_s
            names.append(p)
            waves.append(clip.waveform)
            valid.append(clip.num_valid)
        if not names:
            continue
        feats = enc.prepare(waves, valid)
        out = model.encode_audio(feats["audio"].to(model.device), feats["audio_valid_frac"].to(model.device))
        for p, f in zip(names, out.cpu()):
            yield p, f.contiguous()


def main_cache(cfg, args) -> int:
    """``safe data cache --config FILE``: cache the audio features of every split of every dataset."""
    from safe_av.data.formats import SPLITS
    from safe_av.training.data import read_corpus
    from safe_av.training.loop import Trainer

    folder = args.out or cfg.data.feature_cache
    if not folder:
        print("safe data cache: give --out or set data.feature_cache", flush=True)
        return 2
    if cfg.data.audio_augment:
        print("safe data cache: refused: data.audio_augment is on (features would change every epoch)")
        return 2
    import tempfile

    cfg.data.feature_cache = None  # build with the encoder itself
    cfg.train.trackers = []
    with tempfile.TemporaryDirectory(prefix="safe-cache-") as scratch:  # the Trainer's run folder: not kept
        trainer = Trainer(cfg, scratch)
        trainer.setup()
    names = sorted({d for p in cfg.train.phases for d in p.datasets} | {cfg.data.avqa_dataset})
    paths = []
    for name in names:
        for split in SPLITS[name]:
            try:
                paths += [s.audio for s in read_corpus(cfg.data, [name], split).samples if s.audio]
            except FileNotFoundError:
                continue
    cache = FeatureCache.open(folder, trainer.model, max_seconds=cfg.data.max_audio_seconds)
    stats = cache.build(trainer.model, sorted(set(paths)))
    print(f"feature cache {cache.dir}: {stats}")
    return 0
