"""Optimizer grouping and the warmup + cosine-restart schedule at chosen steps."""

import math

import pytest
import torch
from torch import nn

from safe_av.training.schedule import build_optimizer, build_scheduler, current_lrs


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    return build_optimizer([
        {"name": "projector", "params": model[0].parameters(), "lr": 1e-3},
        {"name": "fusion", "params": list(model[1].parameters()) + list(model[2].parameters()), "lr": 1e-4},
    ])


def _lrs_over(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_build_optimizer_no_decay_on_1d_params() -> None:
    opt = _optimizer(_model())
    summary = [(g["name"], [tuple(p.shape) for p in g["params"]], g["weight_decay"], g["lr"])
               for g in opt.param_groups]
    assert summary == [
        ("projector", [(4, 3)], 0.01, 1e-3),
        ("projector.no_decay", [(4,)], 0.0, 1e-3),
        ("fusion", [(2, 4)], 0.01, 1e-4),
        ("fusion.no_decay", [(4,), (4,), (2,)], 0.0, 1e-4),
    ]
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert current_lrs(opt) == {"lr/projector": 1e-3, "lr/fusion": 1e-4}
    from_yaml = build_optimizer([{"name": "x", "params": [nn.Parameter(torch.ones(2, 2))], "lr": 1.0}],
                                betas=[0.8, 0.9])
    assert from_yaml.param_groups[0]["betas"] == (0.8, 0.9)


def test_build_optimizer_errors_name_the_group() -> None:
    model = _model()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="'projector'.*no trainable"):
        build_optimizer([{"name": "projector", "params": model[0].parameters(), "lr": 1e-3}])
    with pytest.raises(ValueError, match="lacks key"):
        build_optimizer([{"name": "x", "params": model[2].parameters()}])
    with pytest.raises(ValueError, match="duplicate"):
        build_optimizer([{"name": "x", "params": [model[2].weight], "lr": 1.0},
                         {"name": "x", "params": [model[2].bias], "lr": 1.0}])


def test_schedule_values_at_chosen_steps() -> None:
    opt = _optimizer(_model())
    # warmup 4, period = 2 epochs * 5 steps = 10, floor 1e-6
    sched = build_scheduler(opt, warmup_steps=4, steps_per_epoch=5, restart_epochs=2, min_lr=1e-6)
    lrs = _lrs_over(sched, opt, 25)
    proj, fusion = [row[0] for row in lrs], [row[2] for row in lrs]
    expected_proj = {
        0: 2.5e-4,  # 1e-3 * 1/4
        1: 5.0e-4,
        3: 1e-3,  # warmup done
        4: 1e-3,  # cosine t = 0
        9: 1e-6 + (1e-3 - 1e-6) * 0.5,  # t = 5 = half period
        13: 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(0.9 * math.pi)),  # t = 9
        14: 1e-3,  # restart
        24: 1e-3,  # second restart
    }
    for step, value in expected_proj.items():
        assert proj[step] == pytest.approx(value, rel=1e-12), step
    assert fusion[0] == pytest.approx(2.5e-5, rel=1e-12)
    assert fusion[9] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5, rel=1e-12)  # same floor 1e-6
    assert fusion[13] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(0.9 * math.pi)), rel=1e-12)
    assert lrs[5][0] == lrs[5][1]  # decay / no-decay twins share the LR


def test_fractional_restart_epochs_from_yaml() -> None:
    opt = _optimizer(_model())
    sched = build_scheduler(opt, warmup_steps=0, steps_per_epoch=4, restart_epochs=1.5)  # period 6
    proj = [row[0] for row in _lrs_over(sched, opt, 7)]
    assert proj[0] == pytest.approx(1e-3, rel=1e-12) and proj[6] == pytest.approx(1e-3, rel=1e-12)
    assert proj[3] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-12)


def test_schedule_matches_torch_cosine_warm_restarts_after_warmup() -> None:
    ours_opt = _optimizer(_model())
    ours = build_scheduler(ours_opt, warmup_steps=3, steps_per_epoch=4, restart_epochs=2, min_lr=1e-6)
    ref_opt = _optimizer(_model())
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=8, eta_min=1e-6)
    ours_lrs = _lrs_over(ours, ours_opt, 3 + 20)[3:]
    ref_lrs = _lrs_over(ref, ref_opt, 20)
    for a, b in zip(ours_lrs, ref_lrs):
        assert a == pytest.approx(b, rel=1e-12)


def test_scheduler_state_dict_resumes_exactly() -> None:
    opt = _optimizer(_model())
    sched = build_scheduler(opt, warmup_steps=2, steps_per_epoch=3)
    full = _lrs_over(sched, opt, 12)

    opt1 = _optimizer(_model())
    sched1 = build_scheduler(opt1, warmup_steps=2, steps_per_epoch=3)
    first = _lrs_over(sched1, opt1, 7)
    opt2 = _optimizer(_model())
    sched2 = build_scheduler(opt2, warmup_steps=99, steps_per_epoch=50)  # wrong; state wins
    opt2.load_state_dict(opt1.state_dict())
    sched2.load_state_dict(sched1.state_dict())
    assert first + _lrs_over(sched2, opt2, 5) == full


def test_scheduler_rejects_bad_values() -> None:
    opt = _optimizer(_model())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(opt, warmup_steps=1, steps_per_epoch=0)
    with pytest.raises(ValueError, match="restart_epochs"):
        build_scheduler(opt, warmup_steps=1, steps_per_epoch=2, restart_epochs=0.1)


def test_a_group_at_or_below_min_lr_holds_its_rate_after_warmup() -> None:
    """The spec's phase 3 trains base modules at 1e-6, which is also its min_lr: that group stays at 1e-6 while the
    others anneal (building the scheduler used to fail at the start of phase 3)."""
    opt = _optimizer(_model())  # projector 1e-3, fusion 1e-4
    sched = build_scheduler(opt, warmup_steps=2, steps_per_epoch=3, restart_epochs=2, min_lr=1e-4)
    lrs = _lrs_over(sched, opt, 8)
    fusion = [row[-1] for row in lrs]
    assert fusion[:2] == pytest.approx([5e-5, 1e-4]) and fusion[2:] == pytest.approx([1e-4] * 6)
    projector = [row[0] for row in lrs]
    assert projector[2] == pytest.approx(1e-3) and 1e-4 < min(projector[3:]) < 1e-3
