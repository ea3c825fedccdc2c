"""The optimisation loop shared by the tiny models' pretraining (base VL model, audio encoder, vision tower).

All three train with AdamW (weight decay 0.01), a linear warm-up then linear decay to 0, gradient clipping
at 1.0 and a log line every few steps; they differ only in where batches come from and how a batch's loss
is computed. SAFE's own phases have their own loop (``training/loop.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from safe_av.training.schedule import warmup_linear_decay

log = logging.getLogger(__name__)

B = TypeVar("B")


def fit(params: list[torch.nn.Parameter], lr: float, batches: Iterable[B], steps: int,
        loss_of: Callable[[B], torch.Tensor], *, what: str, log_every: int = 100) -> float:
    """``steps`` optimizer steps over ``batches``; returns the last batch's loss.

    Args:
        params: the trainable parameters.
        lr: peak learning rate.
        batches: at least ``steps`` batches, consumed in order.
        steps: optimizer steps (the schedule's length).
        loss_of: a batch's loss.
        what: name used in the log lines.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = warmup_linear_decay(optimizer, steps)
    t0 = time.time()
    loss = torch.zeros(())
    for step, batch in zip(range(steps), batches):
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            log.info("pretrain %s step %d/%d loss %.4f (%.0fs)", what, step + 1, steps, float(loss.detach()),
                     time.time() - t0)
    return float(loss.detach())


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> tuple[Iterator[torch.Tensor], int]:
    """Index batches over ``n`` examples, a fresh seeded permutation per epoch (the last partial batch of
    each epoch dropped); returns them and their number."""
    per_epoch = n // batch_size
    gen = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(per_epoch):
                yield perm[i * batch_size:(i + 1) * batch_size]

    return batches(), epochs * per_epoch
