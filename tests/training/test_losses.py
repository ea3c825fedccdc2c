"""Losses against hand-computed values."""

import math

import pytest
import torch

from safe_av.training.losses import (
    LossWeights,
    composite_loss,
    distillation_loss,
    ewc_penalty,
    retention_loss,
    task_loss,
)

LN3 = math.log(3.0)


def _two_token_logits() -> tuple[torch.Tensor, torch.Tensor]:
    # token 0: logits [0, ln 3, 0] -> p = [1/5, 3/5, 1/5], label 1 -> -ln(3/5) = ln(5/3)
    # token 1: logits [0, 0, 0]    -> p = 1/3 each,      label 0 -> ln 3
    logits = torch.tensor([[[0.0, LN3, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)  # (1, 2, 3)
    labels = torch.tensor([[1, 0]])
    return logits, labels


def test_task_loss_matches_hand_computation() -> None:
    logits, labels = _two_token_logits()
    loss = task_loss(logits, labels)
    # (ln(5/3) + ln 3) / 2 = ln(5) / 2 = 0.804718956...
    assert loss.item() == pytest.approx(0.8047189562, abs=1e-6)
    loss.backward()
    # d/dz CE = softmax - onehot, divided by the 2 counted tokens
    expected = torch.tensor([[[0.2, -0.4, 0.2], [-2 / 3, 1 / 3, 1 / 3]]]) / 2
    torch.testing.assert_close(logits.grad, expected)


def test_task_loss_ignore_index_and_per_sample() -> None:
    logits, labels = _two_token_logits()
    batch = torch.cat([logits, logits]).detach()  # (2, 2, 3)
    masked = torch.tensor([[1, -100], [-100, -100]])
    assert task_loss(batch, masked).item() == pytest.approx(math.log(5 / 3), abs=1e-6)
    per_sample = task_loss(batch, torch.tensor([[1, 0], [-100, 0]]), reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([math.log(5) / 2, LN3]))
    empty = task_loss(batch, torch.tensor([[1, -100], [-100, -100]]), reduction="none")
    torch.testing.assert_close(empty, torch.tensor([math.log(5 / 3), 0.0]))


def test_task_loss_shift_and_all_ignored() -> None:
    logits, _ = _two_token_logits()
    # shifted: logit 0 predicts label at position 1
    shifted = task_loss(logits, torch.tensor([[-100, 1]]), shift=True)
    assert shifted.item() == pytest.approx(math.log(5 / 3), abs=1e-6)
    none = task_loss(logits, torch.full((1, 2), -100))
    assert none.item() == 0.0
    none.backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="labels"):
        task_loss(logits, torch.zeros(1, 3, dtype=torch.long))


def test_retention_loss_masked_mean_over_elements() -> None:
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)  # (1, 2, 2)
    teacher = torch.zeros(1, 2, 2)
    assert retention_loss(student, teacher).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    loss = retention_loss(student, teacher, torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    # d/ds mean((s-t)^2) over 2 elements = 2 (s - t) / 2 at the selected position only
    torch.testing.assert_close(student.grad, torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]))


def test_retention_loss_empty_mask_keeps_graph() -> None:
    student = torch.ones(2, 3, 4, requires_grad=True)
    loss = retention_loss(student, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    with pytest.raises(ValueError, match="mask shape"):
        retention_loss(student, torch.zeros(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))


def test_distillation_matches_hand_computation() -> None:
    temperature = 2.0
    # token 0: student uniform (1/3 each); teacher logits T*[ln 2, 0, 0] -> p_t = [1/2, 1/4, 1/4]
    #   KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8);  x T^2 = 2 ln(9/8)
    # token 1: teacher == student -> 0
    student = torch.zeros(1, 2, 3, requires_grad=True)
    teacher = torch.tensor([[[2 * math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    loss = distillation_loss(student, teacher, temperature=temperature)
    assert loss.item() == pytest.approx(math.log(9 / 8), abs=1e-6)  # mean of 2 ln(9/8) and 0
    assert loss.item() == pytest.approx(0.1177830357, abs=1e-6)
    only_first = distillation_loss(student, teacher, torch.tensor([[True, False]]), temperature=temperature)
    assert only_first.item() == pytest.approx(0.2355660713, abs=1e-6)
    only_first.backward()
    # d/ds T^2 KL = T^2 * (p_s - p_t) / T = T (p_s - p_t)
    expected = torch.tensor([[[2 * (1 / 3 - 1 / 2), 2 * (1 / 3 - 1 / 4), 2 * (1 / 3 - 1 / 4)], [0, 0, 0]]])
    torch.testing.assert_close(student.grad, expected)


def test_distillation_empty_mask_and_teacher_detached() -> None:
    student = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    teacher = torch.randn(2, 3, 5, requires_grad=True)
    empty = distillation_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    distillation_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, temperature=0.0)


def test_ewc_penalty_hand_values_and_gradient() -> None:
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[1.0, -1.0]], requires_grad=True)
    params = {"a": a, "b": b, "new": torch.ones(3, requires_grad=True)}
    anchors = {"a": torch.tensor([0.5, 2.0]), "b": torch.zeros(1, 2)}
    fisher = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([[1.0, 0.5]])}
    # a: 2 * 0.5^2 + 3 * 0 = 0.5 ; b: 1 * 1 + 0.5 * 1 = 1.5
    penalty = ewc_penalty(params, anchors, fisher)
    assert penalty.item() == pytest.approx(2.0)
    penalty.backward()
    torch.testing.assert_close(a.grad, torch.tensor([2.0, 0.0]))  # 2 F (θ - θ*)
    torch.testing.assert_close(b.grad, torch.tensor([[2.0, -1.0]]))


def test_ewc_penalty_errors_and_no_overlap() -> None:
    p = {"w": torch.ones(2, requires_grad=True)}
    with pytest.raises(ValueError, match="'w'"):
        ewc_penalty(p, {"w": torch.ones(2)}, {"w": torch.ones(3)})
    zero = ewc_penalty(p, {}, {})
    assert zero.item() == 0.0 and zero.requires_grad


def test_composite_loss_weights_each_part() -> None:
    parts = {k: torch.tensor(v) for k, v in
             {"task": 2.0, "retention": 3.0, "distill": 5.0, "fisher": 7.0}.items()}
    w = LossWeights(alpha=1.0, beta=0.1, gamma=0.5, delta=0.2)
    assert composite_loss(parts, w).item() == pytest.approx(2.0 + 0.3 + 2.5 + 1.4)
    assert composite_loss({"task": parts["task"]}, w).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown"):
        composite_loss({"task": parts["task"], "kl": parts["task"]}, w)
    with pytest.raises(ValueError, match="'task' is required"):
        composite_loss({"fisher": parts["fisher"]}, w)
    with pytest.raises(ValueError, match="LossWeights.beta"):
        LossWeights(beta=-1.0)
