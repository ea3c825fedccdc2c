"""Curriculum rules: stages, adaptive weights, progression, persistence."""

import json

import pytest

from safe_av.training.curriculum import Curriculum, CurriculumStage, default_stages
from safe_av.training.losses import LossWeights


def _curriculum(**kwargs) -> Curriculum:
    return Curriculum(default_stages(400, min_fraction=0.1), loss_window=4, **kwargs)


def _feed_stable_losses(c: Curriculum, start: int, n: int = 4) -> None:
    for i in range(n):
        c.observe_loss(start + i, 1.0 + 0.01 * (i % 2))  # CV = 0.005 / 1.005 ≈ 0.005


def test_default_stages_follow_the_spec() -> None:
    stages = default_stages(1002)
    assert [(s.name, s.audio_ratio, s.difficulties, s.weights, s.max_steps, s.min_steps) for s in stages] == [
        ("foundation", 0.25, ("easy",), LossWeights(1.0, 0.1, 0.5, 0.1), 250, 125),
        ("development", 0.5, ("easy", "medium"), LossWeights(1.0, 0.3, 0.7, 0.2), 250, 125),
        ("advanced", 0.75, ("medium", "hard"), LossWeights(1.0, 0.5, 0.5, 0.3), 250, 125),
        ("mastery", 1.0, ("easy", "medium", "hard"), LossWeights(1.0, 0.7, 0.3, 0.5), 252, 126),
    ]


def test_stage_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="'x'.*audio_ratio"):
        CurriculumStage("x", 1.5, ("easy",), LossWeights(), 10, 5)
    with pytest.raises(ValueError, match="difficulties"):
        CurriculumStage("x", 0.5, ("trivial",), LossWeights(), 10, 5)
    with pytest.raises(ValueError, match="min_steps"):
        CurriculumStage("x", 0.5, ("easy",), LossWeights(), 10, 11)


def test_low_retention_multiplies_beta_by_fixed_factor() -> None:
    c = _curriculum()
    events = c.update(10, retention=0.93)
    assert [(e.kind, e.step, e.stage, e.reason) for e in events] == [
        ("weight_change", 10, "foundation", "retention 0.930 < 0.95: beta x1.5")
    ]
    assert events[0].details["old"] == pytest.approx(0.1) and events[0].details["new"] == pytest.approx(0.15)
    assert c.effective_weights().beta == pytest.approx(0.15)
    assert c.update(20, retention=0.90) == []  # fixed factor: does not compound
    assert c.effective_weights().beta == pytest.approx(0.15)
    back = c.update(30, retention=0.97)
    assert back[0].reason == "retention 0.970 >= 0.95: beta back to stage base"
    assert c.effective_weights() == LossWeights(1.0, 0.1, 0.5, 0.1)


def test_low_audio_accuracy_multiplies_alpha() -> None:
    c = _curriculum()
    events = c.update(5, audio_accuracy=0.5)
    assert [e.reason for e in events] == ["audio accuracy 0.500 < 0.70: alpha x1.2"]
    assert c.effective_weights().alpha == pytest.approx(1.2)
    assert c.update(6) == []  # no metrics: weights unchanged
    assert c.effective_weights().alpha == pytest.approx(1.2)


def test_compound_mode_is_capped() -> None:
    c = _curriculum(compound=True, max_multiplier=2.0)
    betas = []
    for step in range(4):
        c.update(step, retention=0.8)
        betas.append(c.effective_weights().beta)
    assert betas == pytest.approx([0.15, 0.2, 0.2, 0.2])  # 1.5, 2.25 -> cap 2.0


def test_non_adaptive_keeps_base_weights() -> None:
    c = _curriculum(adaptive=False)
    assert c.update(3, retention=0.1, audio_accuracy=0.1) == []
    assert c.effective_weights() == c.current.weights


def test_advances_only_when_all_criteria_hold_after_min_steps() -> None:
    c = _curriculum()  # foundation: max 100, min 10 steps
    _feed_stable_losses(c, 0)
    assert c.update(5, retention=0.96, audio_accuracy=0.8) == []  # before min_steps
    assert c.update(12, retention=0.94) != [] and c.current.name == "foundation"  # retention low
    c.observe_loss(13, 3.0)  # unstable window: CV of [1.01, 1.0, 1.01, 3.0] ≈ 0.574
    assert c.loss_cv() == pytest.approx(0.5735, abs=1e-3)
    c.update(14, retention=0.96)  # beta back to base, but the loss is not stable
    assert c.current.name == "foundation"
    _feed_stable_losses(c, 16)
    events = c.update(20)
    assert [(e.kind, e.step, e.stage) for e in events] == [("stage_change", 20, "development")]
    assert events[0].reason.startswith("criteria met: retention 0.960 >= 0.95, audio accuracy 0.800 >= 0.70")
    assert events[0].details["from"] == "foundation" and events[0].details["steps_in_stage"] == 20
    assert events[0].details["forced"] is False
    assert c.stage_start_steps == {"foundation": 0, "development": 20}
    assert c.current.audio_ratio == 0.5 and c.effective_weights() == LossWeights(1.0, 0.3, 0.7, 0.2)


def test_stage_audio_accuracy_and_loss_window_reset_on_stage_change() -> None:
    c = _curriculum()
    _feed_stable_losses(c, 0)
    c.update(100)  # max_steps of foundation
    assert c.current.name == "development"
    assert c.loss_cv() is None and c.audio_accuracy is None
    c.update(120, retention=0.99)
    assert c.update(121) == []  # no audio accuracy measured in this stage yet


def test_advances_on_max_steps_and_stops_at_last_stage() -> None:
    c = _curriculum()
    assert c.update(99) == []
    events = c.update(100)
    assert events[0].reason == "max_steps reached (100 >= 100)" and events[0].details["forced"] is True
    for step in (200, 300):
        c.update(step)
    assert c.current.name == "mastery"
    assert c.update(10_000) == [] and c.current.name == "mastery"
    assert c.stage_start_steps == {"foundation": 0, "development": 100, "advanced": 200, "mastery": 300}


def test_begin_starts_the_first_stage_clock_later() -> None:
    c = _curriculum()
    c.begin(400)  # e.g. after a 400-step phase without the curriculum
    assert c.update(450) == [] and c.current.name == "foundation"
    assert c.update(500)[0].reason == "max_steps reached (100 >= 100)"
    assert c.stage_start_steps == {"foundation": 400, "development": 500}
    with pytest.raises(ValueError, match="already in stage 'development'"):
        c.begin(600)


def test_state_dict_round_trips_through_json() -> None:
    c = _curriculum()
    _feed_stable_losses(c, 0, n=3)
    c.update(5, retention=0.9, audio_accuracy=0.6)
    c.update(100)
    c.update(110, retention=0.9)
    state = json.loads(json.dumps(c.state_dict()))
    restored = _curriculum()
    restored.load_state_dict(state)
    assert restored.state_dict() == c.state_dict()
    assert restored.current.name == "development" and restored.effective_weights() == c.effective_weights()
    other = Curriculum(default_stages(400)[:2])
    with pytest.raises(ValueError, match="stage_names"):
        other.load_state_dict(state)


def test_event_record_matches_metrics_jsonl_contract() -> None:
    c = _curriculum()
    record = c.update(7, retention=0.5)[0].to_record()
    assert record["event"] == "weight_change" and record["step"] == 7 and record["stage"] == "foundation"
    assert record["reason"] == "retention 0.500 < 0.95: beta x1.5"
    json.dumps(record)


def test_config_reaches_the_curriculum_compound_and_cap():
    from types import SimpleNamespace

    from safe_av.config import load_config
    from safe_av.training.loop import Trainer

    cfg = load_config("configs/demo.yaml", ["curriculum.adaptive_compound=true",
                                            "curriculum.adaptive_max_multiplier=2.5"])
    c = Trainer._build_curriculum(SimpleNamespace(cfg=cfg))
    assert (c.compound, c.max_multiplier) == (True, 2.5)
    default = Trainer._build_curriculum(SimpleNamespace(cfg=load_config("configs/demo.yaml")))
    assert (default.compound, default.max_multiplier) == (False, 4.0)
