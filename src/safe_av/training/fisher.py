"""Diagonal Fisher information and EWC anchors (spec, "Retention Mechanisms").

The Fisher ``F`` and anchors ``θ*`` are computed once, on VL data at the pretrained values
of the parameters phase 3 unfreezes, and saved; :func:`safe_av.training.losses.ewc_penalty`
then uses them every step.

Per-batch vs per-sample. The Fisher diagonal is ``E_x[(∂ log p(y|x) / ∂θ)²]`` — the square of
*each sample's* gradient. Squaring the gradient of a batch-*mean* loss instead gives
``(mean_i g_i)²``, which for the near-zero-mean gradients of a converged model is about
``1/B`` of the per-sample value and mixes samples. ``per_sample=True`` is the correct
estimator (``loss_fn`` returns ``(B,)`` losses and each sample is backpropagated on its own:
B backward passes through a retained graph); ``per_sample=False`` is the cheap per-batch
approximation (one backward per batch).

Empirical vs true Fisher. ``empirical=True`` uses the data's labels. ``empirical=False``
asks for labels sampled from the model's own predictive distribution (the true Fisher):
``loss_fn`` is then called as ``loss_fn(batch, empirical=False)`` and must return the NLL of
such labels — :func:`sampled_nll` computes it from logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

FORMAT = "safe_av.fisher/1"


def _squared_grads(loss: Tensor, names: list[str], params: list[nn.Parameter],
                   retain_graph: bool) -> dict[str, Tensor]:
    """``{name: (∂loss/∂θ)²}`` in float32; unused parameters get zeros."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return {
        n: torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float().square()
        for n, p, g in zip(names, params, grads)
    }


def _check_loss(loss: Tensor, per_sample: bool) -> None:
    if per_sample and loss.dim() != 1:
        raise ValueError(f"estimate_fisher(per_sample=True): loss_fn must return (B,), got {tuple(loss.shape)}")
    if not per_sample and loss.dim() != 0:
        raise ValueError(f"estimate_fisher(per_sample=False): loss_fn must return a scalar, got {tuple(loss.shape)}")


def estimate_fisher(
    loss_fn: Callable[..., Tensor],
    params: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    empirical: bool = True,
    per_sample: bool = False,
) -> dict[str, Tensor]:
    """Diagonal Fisher: mean over samples (or batches) of squared gradients.

    Put the model in eval mode first (dropout would add noise to the gradients).
    ``.grad`` of the parameters is not touched (``torch.autograd.grad`` is used).

    Args:
        loss_fn: ``loss_fn(batch)`` → scalar mean loss (``per_sample=False``) or ``(B,)``
            per-sample losses (``per_sample=True``); called as
            ``loss_fn(batch, empirical=False)`` when ``empirical`` is False (see module doc).
        params: name → parameter to estimate the Fisher of; all must require grad.
        batches: iterable of whatever ``loss_fn`` takes.
        max_batches: use at most this many batches.
        empirical: labels from the data (True) or sampled from the model (False).
        per_sample: square each sample's gradient (correct) rather than the batch's (cheap).

    Returns:
        name → float32 tensor shaped like the parameter, on its device.

    Raises:
        ValueError: a parameter without ``requires_grad``, a loss of the wrong shape, or no
            batch at all.
    """
    names, tensors = list(params), list(params.values())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"estimate_fisher: parameter(s) {frozen} do not require grad")
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in islice(batches, max_batches):
        loss = loss_fn(batch) if empirical else loss_fn(batch, empirical=False)
        _check_loss(loss, per_sample)
        pieces = list(loss) if per_sample else [loss]
        for i, piece in enumerate(pieces):
            squared = _squared_grads(piece, names, tensors, retain_graph=i < len(pieces) - 1)
            for n in names:
                total[n] += squared[n]
        count += len(pieces)
    if count == 0:
        raise ValueError("estimate_fisher: no batch (or only empty batches) to estimate from")
    return {n: t / count for n, t in total.items()}


def sampled_nll(logits: Tensor, mask: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample NLL of labels drawn from the model's own distribution (true Fisher).

    Args:
        logits: ``(B, T, V)``.
        mask: ``(B, T)`` bool, positions that count; ``None``: all.
        generator: RNG for the draw.

    Returns:
        ``(B,)`` mean NLL over each sample's selected positions (0 where none).
    """
    with torch.no_grad():
        probs = F.softmax(logits.float(), dim=-1)
        labels = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(logits.shape[:-1])
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # (B, T)
    m = torch.ones_like(nll) if mask is None else mask.to(nll.dtype)
    return (nll * m).sum(1) / m.sum(1).clamp_min(1.0)


def anchors(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``θ*``: detached clones of the current parameter values."""
    return {n: p.detach().clone() for n, p in params.items()}


def check_matches(tensors: Mapping[str, Tensor], params: Mapping[str, Tensor], *,
                  what: str = "fisher", strict: bool = True) -> None:
    """Check that ``tensors`` has the names and shapes of ``params``.

    Args:
        tensors: e.g. a loaded Fisher.
        params: the current trainable parameters it should describe.
        what: word used in error messages.
        strict: also require every parameter to have an entry (else only the entries
            present are checked).

    Raises:
        ValueError: naming the first unknown, missing or mis-shaped key.
    """
    for name, t in tensors.items():
        if name not in params:
            raise ValueError(f"{what} has key {name!r} that is not a current trainable parameter")
        if t.shape != params[name].shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(t.shape)}, parameter has {tuple(params[name].shape)}"
            )
    missing = [n for n in params if n not in tensors]
    if strict and missing:
        raise ValueError(f"{what} lacks key {missing[0]!r} (and {len(missing) - 1} more) of the trainable parameters")


def save_fisher(path: str | os.PathLike, fisher: Mapping[str, Tensor],
                anchors: Mapping[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write Fisher and anchors to one safetensors file (atomically).

    Keys are ``fisher.<name>`` and ``anchor.<name>``; ``meta`` (JSON-serialisable: model,
    dataset, number of samples, estimator …) goes in the file's string metadata.

    Raises:
        ValueError: Fisher and anchors with different names or shapes.
    """
    check_matches(anchors, fisher, what="anchors")
    tensors = {f"fisher.{n}": t.detach().float().cpu().contiguous() for n, t in fisher.items()}
    tensors |= {f"anchor.{n}": t.detach().cpu().contiguous().clone() for n, t in anchors.items()}
    data = save(tensors, metadata={"format": FORMAT, "meta": json.dumps(meta)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_fisher(path: str | os.PathLike, *, params: Mapping[str, Tensor] | None = None,
                strict: bool = True, device: str | torch.device = "cpu",
                ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read :func:`save_fisher` output, optionally checking it against ``params``.

    Args:
        path: the safetensors file.
        params: current trainable parameters; when given, names and shapes must match
            (see :func:`check_matches`).
        strict: passed to :func:`check_matches`.
        device: where to put the tensors.

    Returns:
        ``(fisher, anchors, meta)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a Fisher file, or a mismatch with ``params`` (naming the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fisher file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Fisher file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    tensors = load_file(str(path), device=str(device))
    fisher = {k.removeprefix("fisher."): v for k, v in tensors.items() if k.startswith("fisher.")}
    anchor = {k.removeprefix("anchor."): v for k, v in tensors.items() if k.startswith("anchor.")}
    if params is not None:
        check_matches(fisher, params, what=f"fisher ({path})", strict=strict)
    return fisher, anchor, json.loads(metadata["meta"])
