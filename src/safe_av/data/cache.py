"""Frozen audio-feature cache: the audio encoder's pooled tokens, computed once, read from disk.

The audio encoder is frozen, so its output for a given file never changes - unless the file,
the encoder, its feature extractor or the clip preprocessing change. Entries are keyed by the
file's content hash inside a namespace named by a fingerprint of all of those, so a changed
config never reads stale features::

    CACHE/<fingerprint>/config.json           what the fingerprint covers
    CACHE/<fingerprint>/index.json            content sha256 -> [shard, key]
    CACHE/<fingerprint>/bad.json              content sha256 -> why the file could not be encoded
    CACHE/<fingerprint>/shard-00000.safetensors

A file that cannot be decoded is skipped, counted, and its reason kept, so a training or evaluation run that
meets it later skips the sample with that reason (not "missing from the cache").

Random audio augmentation would make features differ per epoch, so it is refused with a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safe_av.data.audio import load_audio
from safe_av.data.records import DataError

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model, max_seconds: float) -> dict:
    """Everything that determines a cached entry besides the file's bytes."""
    return {"encoder": model.audio_encoder.config_fingerprint(), "num_audio_tokens": model.num_audio_tokens,
            "max_seconds": max_seconds, "format": 2}


class FeatureCache:
    """Read/write access to one fingerprint namespace of a cache folder."""

    def __init__(self, folder: Path, fp: dict):
        self.fp = fp
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(folder) / digest
        self.index: dict[str, list] = {}
        if (self.dir / "index.json").is_file():
            self.index = json.loads((self.dir / "index.json").read_text())
        self.bad: dict[str, str] = {}
        if (self.dir / "bad.json").is_file():
            self.bad = json.loads((self.dir / "bad.json").read_text())
        self._hashes: dict[str, tuple] = {}
        self._shards: dict[str, object] = {}
        self.hits = self.misses = 0

    @classmethod
    def open(cls, folder: str | Path, model, *, max_seconds: float = 10.0) -> "FeatureCache":
        return cls(Path(folder), fingerprint(model, max_seconds))

    def key(self, path: str | Path) -> str:
        """Content hash, memoised on (path, size, mtime)."""
        st = os.stat(path)
        memo = self._hashes.get(str(path))
        if memo and memo[0] == (st.st_size, st.st_mtime_ns):
            return memo[1]
        digest = file_sha256(path)
        self._hashes[str(path)] = ((st.st_size, st.st_mtime_ns), digest)
        return digest

    def _known_bad(self, path) -> bool:
        try:
            return self.key(path) in self.bad
        except FileNotFoundError:
            return False

    def __contains__(self, path) -> bool:
        return self.key(path) in self.index

    def get(self, path: str | Path) -> torch.Tensor:
        """(K, D_audio) features of ``path``; KeyError if it was never cached."""
        try:
            key = self.key(path)
        except FileNotFoundError as err:
            raise DataError(path, "audio", str(path), "audio file not found") from err
        if key not in self.index:
            self.misses += 1
            if key in self.bad:  # seen by build() and not decodable: say why, as loading it would
                raise DataError(path, "audio", str(path), self.bad[key])
            raise KeyError(f"{path}: not in the feature cache {self.dir} (run `safe data cache`)")
        shard, name = self.index[key]
        if shard not in self._shards:
            self._shards[shard] = safe_open(str(self.dir / shard), framework="pt")
        self.hits += 1
        return self._shards[shard].get_tensor(name)

    def build(self, model, paths: list[str], *, batch_size: int = 8) -> dict:
        """Encode the files not cached yet (bad files are skipped and counted) and write one new shard."""
        todo, seen, missing = [], set(), 0
        for p in paths:
            try:
                k = self.key(p)
            except FileNotFoundError:
                missing += 1
                log.warning("feature cache: skipped %s: file not found", p)
                continue
            if k not in self.index and k not in self.bad and k not in seen:
                todo.append((p, k))
                seen.add(k)
        stats = {"cached_before": len(self.index), "new": 0, "skipped": 0, "missing": missing,
                 "known_bad": sum(1 for p in set(paths) if self._known_bad(p))}
        if not todo:
            return stats
        self.dir.mkdir(parents=True, exist_ok=True)
        key_of = dict((p, k) for p, k in todo)
        tensors: dict[str, torch.Tensor] = {}
        bad: dict[str, str] = {}
        for p, feat in encode_files(model, [p for p, _ in todo], max_seconds=self.fp["max_seconds"],
                                    batch_size=batch_size):
            if isinstance(feat, DataError):
                log.warning("feature cache: skipped %s", feat)
                stats["skipped"] += 1
                bad[key_of[p]] = feat.reason
            else:
                tensors[key_of[p]] = feat
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
        _write_json(self.dir / "index.json", self.index)
        stats["new"] = len(tensors)
        return stats


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


@torch.no_grad()
def encode_files(model, paths: list[str], *, max_seconds: float, batch_size: int = 8):
    """Yield ``(path, features)`` for each audio file - ``(K, D_audio)`` pooled encoder output on CPU - or
    ``(path, DataError)`` for a file that cannot be loaded. The one place the frozen encoder runs offline."""
    enc = model.audio_encoder
    for start in range(0, len(paths), batch_size):
        names, waves, valid = [], [], []
        for p in paths[start:start + batch_size]:
            try:
                clip = load_audio(p, target_sr=enc.sampling_rate, max_seconds=max_seconds)
            except DataError as err:
                yield p, err
                continue
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
