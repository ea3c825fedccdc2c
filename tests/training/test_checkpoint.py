"""Atomic save, exact resume, crash safety and rotation of checkpoints."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from safe_av.training import checkpoint as ckpt
from safe_av.training.checkpoint import find_best, find_latest, load_checkpoint, save_checkpoint
from safe_av.training.schedule import build_optimizer, build_scheduler

CONFIG = "model: tiny\nlr: 0.001\n"


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = build_optimizer([
        {"name": "head", "params": model[3].parameters(), "lr": 1e-2},
        {"name": "body", "params": list(model[0].parameters()) + list(model[1].parameters()), "lr": 5e-3},
    ])
    scheduler = build_scheduler(optimizer, warmup_steps=2, steps_per_epoch=3, restart_epochs=1)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    """Data and dropout masks come from the global RNG, so RNG restore matters too."""
    for _ in range(steps):
        x, y = torch.randn(5, 4), torch.randn(5, 2)
        loss = (model(x) - y).square().mean() + 1e-3 * float(np.random.rand() + random.random())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _save(run_dir, step, model, optimizer, scheduler, **kwargs):
    defaults = dict(model_state=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                    scaler_state=None, train_state={"step": step}, config_yaml=CONFIG)
    return save_checkpoint(run_dir, step, **(defaults | kwargs))


def _assert_optimizer_states_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][key]) and value.dtype == b["state"][idx][key].dtype


def test_round_trip_is_bit_exact(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 4)
    train_state = {"curriculum": {"index": 1, "losses": [0.5, 0.25]}, "sampler": (3, 17), "best": None}
    scaler_state = {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3}
    path = _save(tmp_path, 4, model, optimizer, scheduler, train_state=train_state, scaler_state=scaler_state)
    assert path == tmp_path / "checkpoints" / "step-0000004" and (path / "COMPLETE").is_file()
    assert (path / "config.yaml").read_text() == CONFIG
    after_save = (torch.rand(3), np.random.rand(), random.random())
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()

    model2, optimizer2, scheduler2 = _setup(seed=1)
    model_state, scaler2, train2 = load_checkpoint(path, optimizer=optimizer2, scheduler=scheduler2)
    after_load = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(after_load[0], after_save[0]) and after_load[1:] == after_save[1:]
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    assert scaler2 == scaler_state and train2 == train_state  # tuple comes back a tuple
    _assert_optimizer_states_equal(optimizer2.state_dict(), saved_opt)
    assert scheduler2.state_dict() == saved_sched
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_resumed_training_is_bit_identical(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 7)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model1, optimizer1, scheduler1 = _setup()
    _train(model1, optimizer1, scheduler1, 3)
    path = _save(tmp_path, 3, model1, optimizer1, scheduler1)
    torch.rand(100), np.random.rand(7), random.random()  # the interrupted process moves on

    model2, optimizer2, scheduler2 = _setup(seed=123)
    model_state, _, _ = load_checkpoint(find_latest(tmp_path), optimizer=optimizer2, scheduler=scheduler2)
    assert find_latest(tmp_path) == path
    model2.load_state_dict(model_state)
    _train(model2, optimizer2, scheduler2, 4)
    for name, value in model2.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    model, optimizer, scheduler = _setup()
    first = _save(tmp_path, 1, model, optimizer, scheduler)

    def crash(tmp, final):
        raise RuntimeError("power cut")

    monkeypatch.setattr(ckpt, "_publish", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _save(tmp_path, 2, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-0000002" / "model.safetensors").is_file()
    assert find_latest(tmp_path) == first
    monkeypatch.undo()

    # a crash after the rename but before COMPLETE: the folder exists and is ignored
    (root / "step-0000003").mkdir()
    assert find_latest(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="step-0000003"):
        load_checkpoint(root / "step-0000003", optimizer=optimizer, scheduler=scheduler)
    fourth = _save(tmp_path, 4, model, optimizer, scheduler)
    assert find_latest(tmp_path) == fourth
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000004"]  # leftovers removed


def test_rotation_keeps_last_n_and_the_best(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    scores = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4, 6: 0.5}
    for step, score in scores.items():
        _save(tmp_path, step, model, optimizer, scheduler, keep_last=2, best_metric=("vl_retention", score, "max"))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000005", "step-0000006"]
    assert find_best(tmp_path) == root / "step-0000002"
    meta = json.loads((root / "step-0000002" / "meta.json").read_text())
    assert meta["metric"] == {"name": "vl_retention", "value": 0.9, "mode": "max"}

    # a new best releases the old one
    _save(tmp_path, 7, model, optimizer, scheduler, keep_last=2, best_metric=("vl_retention", 0.95, "max"))
    assert sorted(p.name for p in root.iterdir()) == ["step-0000006", "step-0000007"]


def test_rotation_min_mode(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    for step, loss in {1: 2.0, 2: 0.5, 3: 1.0, 4: 1.5}.items():
        _save(tmp_path, step, model, optimizer, scheduler, keep_last=1, best_metric=("loss", loss, "min"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_user_errors_name_the_key(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    with pytest.raises(ValueError, match="'sampler.rng'.*object"):
        _save(tmp_path, 1, model, optimizer, scheduler, train_state={"sampler": {"rng": object()}})
    with pytest.raises(ValueError, match="best_metric"):
        _save(tmp_path, 1, model, optimizer, scheduler, best_metric=("acc", 0.5, "up"))
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    other = build_optimizer([{"name": "everything", "params": model.parameters(), "lr": 1e-3}])
    with pytest.raises(ValueError, match="param groups"):
        load_checkpoint(path, optimizer=other, scheduler=None)
    assert find_latest(tmp_path / "nowhere") is None


def test_tied_tensors_are_saved(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    shared = torch.arange(6.0).view(2, 3)
    path = _save(tmp_path, 1, model, optimizer, scheduler, model_state={"a": shared, "b": shared, "c": shared[0]})
    state, _, _ = load_checkpoint(path, optimizer=None, scheduler=None, restore_rng=False)
    assert torch.equal(state["a"], shared) and torch.equal(state["b"], shared)
    assert torch.equal(state["c"], torch.arange(3.0))


def test_resaving_a_step_loses_complete_first_and_later_checkpoints_can_be_dropped(tmp_path, monkeypatch) -> None:
    """Replacing an existing step folder: a crash part-way through the delete leaves a folder without COMPLETE (it
    was deleted in directory order, COMPLETE possibly last, and find_latest then chose a folder without weights);
    a resume from an older checkpoint drops the abandoned run's later ones (drop_after)."""
    import shutil

    model, optimizer, scheduler = _setup()
    for step in (200, 300):
        _save(tmp_path, step, model, optimizer, scheduler)

    def crash(path, *a, **k):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 300, model, optimizer, scheduler)
    monkeypatch.undo()
    assert find_latest(tmp_path).name == "step-0000200"  # 300 lost COMPLETE before anything else
    _save(tmp_path, 300, model, optimizer, scheduler)
    removed = ckpt.drop_after(tmp_path, 200)
    assert [p.name for p in removed] == ["step-0000300"] and find_latest(tmp_path).name == "step-0000200"
