"""Optimizer and learning-rate schedule (spec, "Optimization Configuration").

AdamW with decoupled weight decay on matrices only, and per-group linear warmup followed by
cosine annealing with warm restarts down to ``min_lr``. The schedule is a ``LambdaLR`` whose
lambdas are small callable objects, so ``scheduler.state_dict()`` carries their parameters
and a resumed run follows exactly the same curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)

#: Suffix of the no-weight-decay twin of each named group.
NO_DECAY_SUFFIX = ".no_decay"


def _split_by_decay(params: Iterable[nn.Parameter]) -> tuple[list, list]:
    """Trainable params split into (decayed: ≥2-D, not decayed: ≤1-D)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return decay, no_decay


def build_optimizer(
    param_groups: list[dict[str, Any]],
    *,
    weight_decay: float = 0.01,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> AdamW:
    """AdamW over named parameter groups, without weight decay on 1-D parameters.

    Biases, LayerNorm weights/biases and gate scalars are 1-D (or 0-D); decaying them pulls
    norms and gates towards 0 for no regularisation benefit, so each named group is split
    into ``name`` (≥2-D params, ``weight_decay``) and ``name + ".no_decay"`` (≤1-D params,
    decay 0). A half that would be empty is left out. Parameters with
    ``requires_grad=False`` are skipped. Every torch param group keeps a ``"name"`` key
    (used for ``lr/<name>`` logging and checked on resume).

    Args:
        param_groups: ``[{"name": str, "params": iterable of parameters, "lr": float}, ...]``,
            e.g. ``[{"name": "projector", "params": proj.parameters(), "lr": 5e-5}, ...]``.
        weight_decay: decoupled decay for the ≥2-D parameters.
        betas: AdamW betas (a list, as YAML gives, is stored as a tuple).
        eps: AdamW epsilon.

    Returns:
        The ``torch.optim.AdamW`` optimizer.

    Raises:
        ValueError: a group without name/params/lr, a duplicate name, a non-positive lr, or a
            group without any trainable parameter.
    """
    groups: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, group in enumerate(param_groups):
        missing = [k for k in ("name", "params", "lr") if k not in group]
        if missing:
            raise ValueError(f"param_groups[{i}] lacks key(s) {missing}; has {sorted(group)}")
        name, lr = str(group["name"]), float(group["lr"])
        if name in seen:
            raise ValueError(f"param_groups[{i}]: duplicate group name {name!r}")
        seen.add(name)
        if not lr > 0:
            raise ValueError(f"param_groups[{i}] ({name!r}): lr must be > 0, got {lr}")
        decay, no_decay = _split_by_decay(group["params"])
        if not decay and not no_decay:
            raise ValueError(f"param_groups[{i}] ({name!r}) has no trainable parameter")
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append(
                {"name": name + NO_DECAY_SUFFIX, "params": no_decay, "lr": lr, "weight_decay": 0.0}
            )
    if not groups:
        raise ValueError("build_optimizer: param_groups is empty")
    # torch's fused AdamW (CPU and CUDA): one kernel over all tensors instead of ~10 ops per tensor, which
    # dominated the optimizer step of small adapters (bench/step_overhead.py); the for-each form elsewhere.
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return AdamW(groups, lr=groups[0]["lr"], betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                 fused=fused or None, foreach=None if fused else True)


@dataclass
class WarmupCosineRestarts:
    """LR multiplier of one param group: linear warmup, then cosine with warm restarts.

    At optimizer step ``s`` (0-based; ``LambdaLR`` calls this with its step counter):

    - ``s < warmup_steps``: ``lr = base_lr · (s + 1) / warmup_steps`` (first step ≈ 0,
      step ``warmup_steps − 1`` reaches ``base_lr``);
    - otherwise, with ``t = (s − warmup_steps) mod period``:
      ``lr = min_lr + (base_lr − min_lr) · (1 + cos(π t / period)) / 2``, i.e. the
      ``CosineAnnealingWarmRestarts`` curve (``T_0 = period``, ``T_mult = 1``,
      ``eta_min = min_lr``) shifted by the warmup.

    Returns ``lr / base_lr``, so the floor is ``min_lr`` for every group whatever its base LR.
    A plain dataclass so that ``LambdaLR.state_dict()`` saves its fields (JSON-able).
    """

    base_lr: float
    warmup_steps: int
    period: int
    min_lr: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) % self.period
        cosine = 0.5 * (1.0 + math.cos(math.pi * t / self.period))
        return (self.min_lr + (self.base_lr - self.min_lr) * cosine) / self.base_lr


def build_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    steps_per_epoch: int,
    restart_epochs: float = 2,
    min_lr: float = 1e-6,
) -> LambdaLR:
    """Linear warmup then cosine annealing with warm restarts, per param group.

    Call ``scheduler.step()`` once per *optimizer* step (after ``optimizer.step()``; with
    gradient accumulation that is once per accumulated batch, so ``steps_per_epoch`` counts
    optimizer steps too). Restart period: ``round(restart_epochs * steps_per_epoch)`` steps.

    Args:
        optimizer: e.g. from :func:`build_optimizer`; each group's ``lr`` (or
            ``initial_lr`` if a scheduler ran before) is its base LR.
        warmup_steps: linear warmup length (0: none).
        steps_per_epoch: optimizer steps per epoch.
        restart_epochs: epochs per cosine cycle (the spec's "restart every 2 epochs"); may be
            fractional.
        min_lr: floor of every cycle, absolute (the spec's 1e-6). A group whose base LR is not above it keeps its
            base LR after the warmup (the spec's phase 3 trains unfrozen base modules at 1e-6, its own floor).

    Returns:
        A ``LambdaLR`` with one :class:`WarmupCosineRestarts` per group.

    Raises:
        ValueError: non-positive counts or period, or a negative ``min_lr``.
    """
    for key, value, low in (("warmup_steps", warmup_steps, 0), ("steps_per_epoch", steps_per_epoch, 1)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"build_scheduler: {key} must be an int >= {low}, got {value!r}")
    period = round(restart_epochs * steps_per_epoch)
    if period < 1:
        raise ValueError(
            f"build_scheduler: restart_epochs * steps_per_epoch must be >= 1 step, got "
            f"{restart_epochs} * {steps_per_epoch}"
        )
    if not min_lr >= 0:
        raise ValueError(f"build_scheduler: min_lr must be >= 0, got {min_lr}")
    lambdas = []
    for i, group in enumerate(optimizer.param_groups):
        base = float(group.get("initial_lr", group["lr"]))
        if base <= min_lr and not str(group.get("name", "")).endswith(NO_DECAY_SUFFIX):
            log.info("learning rate of group %r (%g) is not above min_lr (%g): it stays at %g after the warmup",
                     group.get("name", i), base, min_lr, base)
        lambdas.append(WarmupCosineRestarts(base, warmup_steps, period, min(min_lr, base)))
    return LambdaLR(optimizer, lambdas)


def current_lrs(optimizer: Optimizer) -> dict[str, float]:
    """``{"lr/<group name>": lr}`` for logging; a ``.no_decay`` twin reports as its group."""
    lrs: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = str(group.get("name", i)).removesuffix(NO_DECAY_SUFFIX)
        lrs.setdefault(f"lr/{name}", float(group["lr"]))
    return lrs


__all__ = [
    "NO_DECAY_SUFFIX",
    "WarmupCosineRestarts",
    "build_optimizer",
    "build_scheduler",
    "current_lrs",
]


def warmup_linear_decay(optimizer: Optimizer, steps: int, *, warmup_fraction: float = 0.1) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``steps``, then linear decay to 0 (the tiny models'
    pretraining; SAFE's own phases use :func:`build_scheduler`)."""
    warm = max(1, int(steps * warmup_fraction))
    return LambdaLR(optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
