"""Modality-ratio / curriculum batch sampler, distributed-aware (numpy only).

Every batch holds exactly ``round(audio_ratio * batch_size)`` audio-bearing samples
(Python's ``round``: halves go to even) and fills the rest from samples without
audio. Within each of the two pools datasets are mixed by ``dataset_weights``.
A curriculum stage is a (``audio_ratio``, ``difficulties``) pair: when the stage
changes, build a new sampler (cheap).

Epoch. Each pool is permuted from ``(seed, epoch)``, identically on every rank,
cut to a multiple of ``world_size`` and dealt out ``perm[rank::world_size]``, so
ranks hold disjoint samples. The epoch has as many batches as the scarcer *needed*
pool supports on one rank: ``min(pool_size / per_batch_need)`` over the pools a
batch draws from (floor with ``drop_last=True``, ceil otherwise: the last batch is
then filled by wrapping round). So each sample of the scarcer pool is seen once per
epoch, the larger pool contributes a fresh random subset each epoch.

Weights. ``dataset_weights=None`` mixes by size (each pooled sample is equally
likely, each seen at most once per epoch). With weights, each slot of a pool draws
its dataset with probability ``w_d / sum(w)`` over that pool's datasets, walking the
dataset's shard in random order and reshuffling it when exhausted; a rank only ever
repeats its own shard, so ranks stay disjoint. Datasets missing from the dict get
weight 1; weight 0 excludes a dataset; a key naming no dataset in ``samples`` raises.

Resume. ``state_dict()`` is ``{"epoch", "position", "seed", "world_size"}`` where
``position`` counts batches handed out in the current epoch; ``load_state_dict``
then yields exactly the remaining batches of that epoch. With a prefetching
DataLoader the sampler runs ahead of training: save the number of batches the loop
actually consumed as ``position`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from math import ceil

import numpy as np

from safe_av.data.records import Sample

_POOLS = ("audio", "other")


class CurriculumBatchSampler:
    """Batches of sample indices with a fixed audio share; see the module docstring.

    Args:
        samples: all samples (only ``dataset``, ``audio`` and ``difficulty`` are read).
        batch_size: samples per batch (per rank).
        audio_ratio: share of audio-bearing samples per batch, in [0, 1].
        dataset_weights: relative weight of each dataset within its pool, or None.
        difficulties: keep only samples with these difficulty labels (None: all).
        seed: base seed; the order depends only on (seed, epoch, rank, world_size).
        rank, world_size: this process and the number of processes.
        drop_last: floor (True) or ceil (False) the number of batches per epoch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        batch_size: int,
        audio_ratio: float,
        dataset_weights: dict[str, float] | None = None,
        difficulties: set[str] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        _check_args(batch_size, audio_ratio, rank, world_size)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last = drop_last
        self.need = {"audio": round(audio_ratio * batch_size)}
        self.need["other"] = batch_size - self.need["audio"]
        self.weighted = dataset_weights is not None
        self.groups = _group(samples, difficulties)  # pool -> dataset -> sorted indices
        self.weights = _resolve_weights(dataset_weights, samples, self.groups)
        self.num_batches = self._count_batches()
        self.epoch, self.position = 0, 0

    # --- public API -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; moving to another epoch restarts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["position"]`` of ``state["epoch"]``.

        Raises:
            ValueError: missing key, a position outside the epoch, or a seed/world_size
                that differs from this sampler's (the order would not match).
        """
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"sampler state_dict: missing key {key!r} in {state}")
        for key in ("seed", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state_dict: {key}={state[key]} but this sampler has {key}={getattr(self, key)}"
                )
        if not 0 <= state["position"] <= self.num_batches:
            raise ValueError(f"sampler state_dict: position={state['position']} outside [0, {self.num_batches}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        for b in range(self.position, len(batches)):
            self.position = b + 1
            yield batches[b]
        self.epoch, self.position = self.epoch + 1, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` for this rank (pure: does not move the position)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        streams = {p: self._pool_stream(p, epoch, rng) for p in _POOLS if self.need[p]}
        batches = []
        for b in range(self.num_batches):
            parts = [streams[p][b * self.need[p] : (b + 1) * self.need[p]] for p in streams]
            batch = np.concatenate(parts)[rng.permutation(self.batch_size)]
            batches.append(batch.tolist())
        return batches

    # --- internals ---------------------------------------------------------------------
    def _shards(self, pool: str, epoch: int) -> dict[str, np.ndarray]:
        """This rank's disjoint share of each dataset (or of the whole pool if unweighted)."""
        groups = {d: ix for d, ix in self.groups[pool].items() if self.weights[pool].get(d, 0) > 0}
        if not self.weighted:
            groups = {"*": np.sort(np.concatenate(list(groups.values())))} if groups else {}
        shards = {}
        for k, (name, ix) in enumerate(sorted(groups.items())):
            shared = np.random.default_rng([self.seed, epoch, _POOLS.index(pool), k, 0])  # same on all ranks
            per_rank = len(ix) // self.world_size
            if per_rank:
                perm = shared.permutation(ix)[: per_rank * self.world_size]
                shards[name] = perm[self.rank :: self.world_size]
        return shards

    def _pool_stream(self, pool: str, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """``num_batches * need`` indices of ``pool`` for this rank."""
        n = self.num_batches * self.need[pool]
        shards = self._shards(pool, epoch)
        if not self.weighted:
            return _cycle(shards["*"], n, rng)
        names = sorted(shards)
        w = np.array([self.weights[pool][d] for d in names], dtype=float)
        choice = rng.choice(len(names), size=n, p=w / w.sum())
        out = np.empty(n, dtype=np.int64)
        for k, name in enumerate(names):
            slots = np.flatnonzero(choice == k)
            out[slots] = _cycle(shards[name], len(slots), rng)
        return out

    def _count_batches(self) -> int:
        counts = []
        for pool in _POOLS:
            if not self.need[pool]:
                continue
            size = sum(len(s) for s in self._shards(pool, 0).values())  # sizes do not depend on epoch
            if size == 0:
                raise ValueError(
                    f"sampler: batches need {self.need[pool]} {pool} sample(s) each, but no eligible "
                    f"{'audio-bearing' if pool == 'audio' else 'audio-free'} sample is left for rank {self.rank} "
                    f"(after difficulty filter / weights; pool sizes {self._sizes()})"
                )
            counts.append(size / self.need[pool])
        fewest = min(counts)
        return int(fewest) if self.drop_last else ceil(fewest)

    def _sizes(self) -> dict[str, dict[str, int]]:
        return {p: {d: len(ix) for d, ix in g.items()} for p, g in self.groups.items()}


def _check_args(batch_size: int, audio_ratio: float, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"sampler: batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= audio_ratio <= 1.0:
        raise ValueError(f"sampler: audio_ratio must be in [0, 1], got {audio_ratio}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _group(samples: Sequence[Sample], difficulties: set[str] | None) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, list[int]]] = {p: {} for p in _POOLS}
    for i, s in enumerate(samples):
        if difficulties is not None and s.difficulty not in difficulties:
            continue
        groups["audio" if s.audio is not None else "other"].setdefault(s.dataset, []).append(i)
    return {p: {d: np.asarray(ix, dtype=np.int64) for d, ix in g.items()} for p, g in groups.items()}


def _resolve_weights(
    weights: dict[str, float] | None, samples: Sequence[Sample], groups: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    if weights is not None:
        known = {s.dataset for s in samples}
        for name, w in weights.items():
            if name not in known:
                raise ValueError(
                    f"sampler: dataset_weights names {name!r}, which has no samples (have {sorted(known)})"
                )
            if not w >= 0:
                raise ValueError(f"sampler: dataset_weights[{name!r}] must be >= 0, got {w}")
    weights = weights or {}
    return {p: {d: float(weights.get(d, 1.0)) for d in g} for p, g in groups.items()}


def _cycle(shard: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` items: ``shard`` in its (already random) order, then reshuffled repeats."""
    if n <= len(shard):
        return shard[:n]
    reps = [shard] + [rng.permutation(shard) for _ in range(ceil(n / len(shard)) - 1)]
    return np.concatenate(reps)[:n]
