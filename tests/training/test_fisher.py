"""Diagonal Fisher against analytic squared gradients; save/load with checks."""

import math

import pytest
import torch
from torch import nn

from safe_av.training.fisher import anchors, estimate_fisher, load_fisher, sampled_nll, save_fisher

# Linear(2, 1) with w = [1, -1], b = 0 and per-sample loss 0.5 (w·x + b − y)²:
# ∂/∂w = r x, ∂/∂b = r, with residual r = w·x + b − y.
#   batch 1: x = [1, 2], y = 0 -> r = -1 ; x = [3, 0], y = 1 -> r = 2
#   batch 2: x = [0, 1], y = 1 -> r = -2
BATCHES = [
    (torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([0.0, 1.0])),
    (torch.tensor([[0.0, 1.0]]), torch.tensor([1.0])),
]


def _linear() -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.bias.zero_()
    return layer


def _per_sample_loss(layer: nn.Linear):
    return lambda batch: 0.5 * (layer(batch[0]).squeeze(-1) - batch[1]).square()  # (B,)


def test_per_sample_fisher_matches_analytic() -> None:
    layer = _linear()
    fisher = estimate_fisher(_per_sample_loss(layer), dict(layer.named_parameters()), BATCHES, per_sample=True)
    # w: mean of (r x)² = ([1, 4] + [36, 0] + [0, 4]) / 3 ; b: mean of r² = (1 + 4 + 4) / 3
    torch.testing.assert_close(fisher["weight"], torch.tensor([[37 / 3, 8 / 3]]))
    torch.testing.assert_close(fisher["bias"], torch.tensor([3.0]))
    assert layer.weight.grad is None  # autograd.grad, .grad untouched


def test_per_batch_fisher_squares_the_batch_mean_gradient() -> None:
    layer = _linear()
    mean_loss = lambda batch: _per_sample_loss(layer)(batch).mean()  # noqa: E731
    params = dict(layer.named_parameters())
    fisher = estimate_fisher(mean_loss, params, BATCHES)
    # batch 1 mean grad: w = ([-1, -2] + [6, 0]) / 2 = [2.5, -1], b = 0.5 ; batch 2: w = [0, -2], b = -2
    torch.testing.assert_close(fisher["weight"], torch.tensor([[(6.25 + 0) / 2, (1 + 4) / 2]]))
    torch.testing.assert_close(fisher["bias"], torch.tensor([(0.25 + 4) / 2]))
    first_only = estimate_fisher(mean_loss, params, iter(BATCHES), max_batches=1)
    torch.testing.assert_close(first_only["weight"], torch.tensor([[6.25, 1.0]]))


def test_true_fisher_with_sampled_labels_approximates_p_times_one_minus_p() -> None:
    # logits = b for every sample; ∂NLL/∂b_k = p_k − 1[y = k] -> E_y~p[(.)²] = p_k (1 − p_k)
    bias = nn.Parameter(torch.tensor([0.0, math.log(2.0), math.log(3.0)]))  # p = [1/6, 2/6, 3/6]
    gen = torch.Generator().manual_seed(0)

    def loss_fn(n: int, empirical: bool = True) -> torch.Tensor:
        assert not empirical
        return sampled_nll(bias.expand(n, 1, 3), generator=gen)  # (n,)

    fisher = estimate_fisher(loss_fn, {"bias": bias}, [10] * 60, empirical=False, per_sample=True)
    torch.testing.assert_close(fisher["bias"], torch.tensor([5 / 36, 8 / 36, 9 / 36]), atol=0.015, rtol=0)


def test_estimate_fisher_errors() -> None:
    layer = _linear()
    layer.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="'bias'"):
        estimate_fisher(_per_sample_loss(layer), dict(layer.named_parameters()), BATCHES, per_sample=True)
    with pytest.raises(ValueError, match=r"must return \(B,\)"):
        estimate_fisher(lambda b: torch.tensor(1.0), {"weight": layer.weight}, BATCHES, per_sample=True)
    with pytest.raises(ValueError, match="no batch"):
        estimate_fisher(_per_sample_loss(layer), {"weight": layer.weight}, [], per_sample=True)


def test_anchors_are_detached_clones() -> None:
    layer = _linear()
    theta = anchors(dict(layer.named_parameters()))
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not theta["weight"].requires_grad
    torch.testing.assert_close(theta["weight"], torch.tensor([[1.0, -1.0]]))


def test_save_load_round_trip_and_checks(tmp_path) -> None:
    layer = _linear()
    params = dict(layer.named_parameters())
    fisher = estimate_fisher(_per_sample_loss(layer), params, BATCHES, per_sample=True)
    path = save_fisher(tmp_path / "fisher.safetensors", fisher, anchors(params), {"samples": 3, "data": "vqav2"})
    loaded, theta, meta = load_fisher(path, params=params)
    assert meta == {"samples": 3, "data": "vqav2"}
    assert all(torch.equal(loaded[k], fisher[k]) for k in fisher) and loaded.keys() == fisher.keys()
    assert torch.equal(theta["bias"], torch.zeros(1))

    other = dict(nn.Linear(3, 1).named_parameters())
    with pytest.raises(ValueError, match=r"fisher.*\['weight'\] has shape \(1, 2\)"):
        load_fisher(path, params=other)
    with pytest.raises(ValueError, match="lacks key 'extra'"):
        load_fisher(path, params=params | {"extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="key 'bias' that is not"):
        load_fisher(path, params={"weight": layer.weight})
    load_fisher(path, params=params | {"extra": torch.zeros(1)}, strict=False)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_fisher(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="anchors lacks key 'bias'"):
        save_fisher(tmp_path / "bad.safetensors", fisher, {"weight": layer.weight}, {})
