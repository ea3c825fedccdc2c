"""SAFE's losses: pure functions on tensors, combined in one visible line.

``L_total = α·L_task + β·L_retention + γ·L_distill + δ·L_fisher`` (spec, "Loss Functions &
Optimization"). Nothing here knows about the model: callers pass logits, features and
parameter dicts. Every function returns a scalar tensor whose graph reaches its trainable
inputs, also when a mask selects nothing (then the value is ``x.sum() * 0``), so a step with
an empty mask still backpropagates (zero gradients) instead of failing or producing NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: Keys :func:`composite_loss` understands; only ``"task"`` is required.
LOSS_PARTS = ("task", "retention", "distill", "fisher")


def task_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    *,
    reduction: Literal["mean", "none"] = "mean",
    shift: bool = False,
) -> Tensor:
    """Token-level cross entropy (the spec's ``L_task``).

    ``labels[b, t]`` is the target of ``logits[b, t]``. Causal-LM outputs predict the *next*
    token: pass ``shift=True`` (as transformers' ``ForCausalLM`` losses do) to drop the last
    logit and the first label. Computed in float32 whatever the logits' dtype.

    Args:
        logits: ``(B, T, V)`` unnormalised scores.
        labels: ``(B, T)`` token ids; positions equal to ``ignore_index`` do not count.
        ignore_index: label value that masks a position.
        reduction: ``"mean"``: mean over all unmasked tokens of the batch, shape ``()``.
            ``"none"``: per-sample mean over that sample's unmasked tokens, shape ``(B,)``
            (for per-sample weighting or per-sample Fisher); a sample without unmasked
            tokens gets 0.
        shift: align next-token predictions first (see above).

    Returns:
        Scalar ``()`` or ``(B,)`` loss. With no unmasked token at all, ``logits.sum() * 0``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"task_loss: expected logits (B, T, V) and labels (B, T), got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"task_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=ignore_index, reduction="none"
    )  # (B, T), 0 at ignored positions
    valid = (labels != ignore_index).to(per_token.dtype)  # (B, T)
    if reduction == "none":
        return per_token.sum(1) / valid.sum(1).clamp_min(1.0)  # (B,)
    count = valid.sum()
    if count == 0:
        return logits.sum() * 0
    return per_token.sum() / count


def _expand_mask(mask: Tensor | None, like: Tensor, name: str) -> Tensor:
    """Bool mask broadcast over ``like``; ``mask`` must match a prefix of its shape."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if mask.shape != like.shape[: mask.dim()]:
        raise ValueError(
            f"{name}: mask shape {tuple(mask.shape)} must equal the leading dims of "
            f"{tuple(like.shape)}"
        )
    mask = mask.to(device=like.device, dtype=torch.bool)
    return mask.reshape(*mask.shape, *([1] * (like.dim() - mask.dim()))).expand_as(like)


def _check_same_shape(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student shape {tuple(student.shape)} != teacher shape "
            f"{tuple(teacher.shape)}"
        )


def retention_loss(
    student_features: Tensor, teacher_features: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Feature MSE between the SAFE model and the frozen original (the spec's ``L_retention``).

    The teacher is a constant (detached): only the student receives gradients.

    Args:
        student_features: ``(B, N, D)`` (any shape works) features of the SAFE model.
        teacher_features: same shape, features of the original VL model.
        mask: bool, shape equal to the leading dims of the features (e.g. ``(B, N)``);
            True marks positions that count. ``None``: all positions.

    Returns:
        Scalar: mean squared error over the selected *elements* (positions × D);
        ``student_features.sum() * 0`` when the mask selects nothing.
    """
    _check_same_shape(student_features, teacher_features, "retention_loss")
    if mask is not None and mask.dim() < student_features.dim():  # a position mask: select those positions first
        rows = _expand_mask(mask, student_features[..., 0], "retention_loss")
        if not bool(rows.any()):
            return student_features.sum() * 0
        student_features, teacher_features, mask = student_features[rows], teacher_features[rows], None
    selected = _expand_mask(mask, student_features, "retention_loss")
    count = selected.sum()
    if count == 0:
        return student_features.sum() * 0
    diff = student_features.float() - teacher_features.detach().float()
    return (diff.square() * selected).sum() / count


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 3.0,
) -> Tensor:
    """Soft-target distillation, ``T² · KL(teacher ‖ student)`` (the spec's ``L_distill``).

    Per token: ``Σ_v p_t(v) · (log p_t(v) − log p_s(v))`` with ``p = softmax(z / T)``,
    i.e. ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)`` summed over the
    vocabulary; averaged over the selected tokens; times ``T²`` so gradient magnitudes do not
    shrink with the temperature (Hinton et al., 2015). The teacher is detached.

    Args:
        student_logits: ``(B, T, V)`` (any ``(..., V)`` works).
        teacher_logits: same shape.
        mask: bool, shape equal to the logits' leading dims without ``V`` (e.g. ``(B, T)``).
        temperature: softening temperature ``T > 0``.

    Returns:
        Scalar; ``student_logits.sum() * 0`` when the mask selects nothing.
    """
    _check_same_shape(student_logits, teacher_logits, "distillation_loss")
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    if mask is not None:  # select first: softmax only over the counted positions, not a (B, T, V) copy
        selected = _expand_mask(mask, student_logits[..., 0], "distillation_loss")
        if not bool(selected.any()):
            return student_logits.sum() * 0
        student_logits, teacher_logits = student_logits[selected], teacher_logits[selected]
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_token = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    return per_token.mean() * temperature**2


def ewc_penalty(
    params: dict[str, Tensor], anchors: dict[str, Tensor], fisher: dict[str, Tensor]
) -> Tensor:
    """Elastic-weight-consolidation penalty ``Σ_i F_i (θ_i − θ*_i)²`` (the spec's ``L_fisher``).

    The spec's strength λ is the composite weight δ, so it is not applied here. Only names
    present in all three dicts contribute (phase-specific parameters such as the projector
    have no Fisher entry). Computed in float32; anchors and Fisher are moved to each
    parameter's device (keep them there to make this free).

    Args:
        params: name → current parameter θ (any shape).
        anchors: name → pretrained value θ*, same shape.
        fisher: name → diagonal Fisher F, same shape.

    Returns:
        Scalar sum (not mean) over all elements; ``0`` with the graph intact when no name is
        shared.

    Raises:
        ValueError: a shared name whose anchor or Fisher shape differs from the parameter's.
    """
    total: Tensor | None = None
    for name, theta in params.items():
        if name not in anchors or name not in fisher:
            continue
        for kind, other in (("fisher", fisher[name]), ("anchor", anchors[name])):
            if other.shape != theta.shape:
                raise ValueError(
                    f"ewc_penalty: {kind} for {name!r} has shape {tuple(other.shape)}, "
                    f"parameter has {tuple(theta.shape)}"
                )
        anchor = anchors[name].to(theta.device, torch.float32)
        weight = fisher[name].to(theta.device, torch.float32)
        term = (weight * (theta.float() - anchor).square()).sum()
        total = term if total is None else total + term
    if total is not None:
        return total
    if params:
        return sum(p.sum() * 0 for p in params.values())  # type: ignore[return-value]
    return torch.zeros(())


@dataclass(frozen=True)
class LossWeights:
    """Weights of the composite loss ``α·task + β·retention + γ·distill + δ·fisher``."""

    alpha: float = 1.0
    """Task (cross-entropy) weight α."""
    beta: float = 0.0
    """Feature-retention (MSE) weight β."""
    gamma: float = 0.0
    """Distillation (KL) weight γ."""
    delta: float = 0.0
    """EWC/Fisher weight δ (the spec's λ)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        """``{"alpha": …, "beta": …, "gamma": …, "delta": …}`` (JSON-serialisable)."""
        return {k: float(v) for k, v in asdict(self).items()}


def composite_loss(parts: dict[str, Tensor], w: LossWeights) -> Tensor:
    """``α·task + β·retention + γ·distill + δ·fisher``.

    Args:
        parts: scalar losses keyed by ``"task"`` (required), ``"retention"``, ``"distill"``,
            ``"fisher"``; a missing optional part counts as 0 (e.g. no Fisher in phase 1).
        w: the weights, usually ``curriculum.effective_weights()``.

    Returns:
        Scalar total loss.

    Raises:
        ValueError: an unknown key or a missing ``"task"``.
    """
    unknown = sorted(set(parts) - set(LOSS_PARTS))
    if unknown:
        raise ValueError(f"composite_loss: unknown loss part(s) {unknown}; known: {LOSS_PARTS}")
    if "task" not in parts:
        raise ValueError(f"composite_loss: 'task' is required, got parts {sorted(parts)}")
    task = parts["task"]
    retention, distill, fisher = (parts.get(k, task.new_zeros(())) for k in LOSS_PARTS[1:])
    return w.alpha * task + w.beta * retention + w.gamma * distill + w.delta * fisher
