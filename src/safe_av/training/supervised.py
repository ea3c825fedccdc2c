"""The minibatch loop shared by the tiny encoders' supervised pretraining (audio and vision).

Both train an encoder plus linear read-out heads on targets they render themselves: AdamW, warm-up then
linear decay, gradient clipping at 1.0, a seeded permutation per epoch, a log line every few epochs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from safe_av.training.schedule import warmup_linear_decay

log = logging.getLogger(__name__)


def fit(params: list[torch.nn.Parameter], n: int, recipe, loss_of: Callable[[torch.Tensor], torch.Tensor], *,
        what: str, log_every: int = 10) -> tuple[int, float]:
    """Train ``params`` for ``recipe.epochs`` epochs over ``n`` examples; returns (steps, last loss).

    Args:
        params: the trainable parameters (encoder + heads).
        n: number of training examples; batches are ``recipe.batch_size`` indices into them.
        recipe: ``epochs``, ``lr``, ``batch_size`` and ``seed`` (an encoder's pretraining config).
        loss_of: the loss of a batch, given its (B,) example indices.
        what: name used in the log lines.
    """
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    per_epoch = n // recipe.batch_size
    steps = recipe.epochs * per_epoch
    schedule = warmup_linear_decay(optimizer, steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    t0 = time.time()
    loss = torch.zeros(())
    for epoch in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            loss = loss_of(perm[i * recipe.batch_size:(i + 1) * recipe.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
        if epoch % log_every == log_every - 1 or epoch == recipe.epochs - 1:
            log.info("pretrain %s epoch %d/%d loss %.4f (%.0fs)", what, epoch + 1, recipe.epochs, float(loss.detach()),
                     time.time() - t0)
    return steps, float(loss.detach())
