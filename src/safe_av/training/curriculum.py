"""Four-stage curriculum with progression criteria and adaptive loss weights.

Pure bookkeeping (spec, "Curriculum Learning" and "Loss Weighting Strategy"): the training
loop reports losses and evaluation metrics, the curriculum answers with the current stage
(audio ratio and difficulties for the sampler), the effective loss weights, and
:class:`Event`\\ s that explain every change. Its whole state is a JSON-able dict.

Adaptive weighting — how the spec's ``β *= 1.5`` / ``α *= 1.2`` is read. Taken literally
(multiply at every evaluation while the condition holds) the weights grow geometrically
without bound during a long dip. Here each is a *fixed factor while the condition holds*:
at every evaluation the multiplier is recomputed from the stage's base weights —
``β_eff = β_stage × 1.5`` while ``retention < 0.95``, else ``β_stage``; likewise α with audio
accuracy. ``compound=True`` gives the literal reading (multiply again at each evaluation
while the condition holds, back to 1 once it clears); ``max_multiplier`` caps either mode.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from safe_av.training.losses import LossWeights

DIFFICULTIES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class CurriculumStage:
    """One curriculum stage."""

    name: str
    """Unique stage name (logged as ``stage``)."""
    audio_ratio: float
    """Fraction of batches that contain audio, in [0, 1]."""
    difficulties: tuple[str, ...]
    """Sample difficulties drawn in this stage, from ``easy``/``medium``/``hard``."""
    weights: LossWeights
    """Base loss weights of the stage (before adaptive multipliers)."""
    max_steps: int
    """The stage ends after this many optimizer steps whatever the criteria."""
    min_steps: int
    """The criteria may end the stage only after this many steps."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.audio_ratio <= 1.0:
            raise ValueError(f"stage {self.name!r}: audio_ratio must be in [0, 1], got {self.audio_ratio}")
        bad = [d for d in self.difficulties if d not in DIFFICULTIES]
        if bad or not self.difficulties:
            raise ValueError(
                f"stage {self.name!r}: difficulties must be a non-empty subset of {DIFFICULTIES}, "
                f"got {self.difficulties}"
            )
        if not 0 <= self.min_steps <= self.max_steps or self.max_steps < 1:
            raise ValueError(
                f"stage {self.name!r}: need 0 <= min_steps <= max_steps and max_steps >= 1, got "
                f"min_steps={self.min_steps}, max_steps={self.max_steps}"
            )


def default_stages(total_steps: int, *, min_fraction: float = 0.5) -> list[CurriculumStage]:
    """The spec's four stages, each at most 25% of ``total_steps`` (the last takes the rest).

    Args:
        total_steps: optimizer steps of the curriculum-driven training.
        min_fraction: each stage runs at least this fraction of its ``max_steps`` before the
            criteria may advance it.

    Returns:
        Foundation, Development, Advanced, Mastery.
    """
    if total_steps < 4:
        raise ValueError(f"default_stages: total_steps must be >= 4, got {total_steps}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"default_stages: min_fraction must be in [0, 1], got {min_fraction}")
    quarter = total_steps // 4
    spec = [
        ("foundation", 0.25, ("easy",), LossWeights(1.0, 0.1, 0.5, 0.1), quarter),
        ("development", 0.5, ("easy", "medium"), LossWeights(1.0, 0.3, 0.7, 0.2), quarter),
        ("advanced", 0.75, ("medium", "hard"), LossWeights(1.0, 0.5, 0.5, 0.3), quarter),
        ("mastery", 1.0, DIFFICULTIES, LossWeights(1.0, 0.7, 0.3, 0.5), total_steps - 3 * quarter),
    ]
    return [
        CurriculumStage(name, ratio, diff, w, n, int(n * min_fraction))
        for name, ratio, diff, w, n in spec
    ]


@dataclass
class Event:
    """Something the curriculum changed, with the reason (logged to ``metrics.jsonl``)."""

    kind: str
    """``"stage_change"`` or ``"weight_change"``."""
    step: int
    stage: str
    """Stage in force after the change."""
    reason: str
    """Human-readable cause, e.g. ``"retention 0.930 < 0.95: beta x1.5"``."""
    details: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` event record (see docs/interfaces.md)."""
        return {"event": self.kind, "step": self.step, "stage": self.stage,
                "reason": self.reason, **self.details}


class Curriculum:
    """Stages, progression criteria and adaptive loss weights.

    Loop protocol: ``observe_loss(step, loss)`` after every optimizer step;
    ``update(step, retention=..., audio_accuracy=...)`` after every step too (metrics
    ``None`` when no evaluation ran — then only ``max_steps`` is checked) or at least at
    each evaluation; read ``current`` and ``effective_weights()``.

    A stage (not the last) advances when it has run ``max_steps`` steps, or when it has run
    ``min_steps`` and all criteria hold: latest retention ≥ ``retention_threshold``, latest
    audio accuracy *measured in this stage* ≥ ``audio_acc_threshold``, and the coefficient
    of variation (population std / |mean|) of the last ``loss_window`` losses of this stage
    ≤ ``loss_cv_threshold``.

    On a stage change the loss window and the stage audio accuracy are reset (both describe
    the old stage's data) and so is the α multiplier; the β multiplier is kept because
    retention is a stage-independent measure.
    """

    def __init__(
        self,
        stages: list[CurriculumStage],
        *,
        retention_threshold: float = 0.95,
        audio_acc_threshold: float = 0.70,
        loss_cv_threshold: float = 0.10,
        loss_window: int = 50,
        adaptive: bool = True,
        beta_factor: float = 1.5,
        alpha_factor: float = 1.2,
        compound: bool = False,
        max_multiplier: float = 4.0,
        start_step: int = 0,
    ) -> None:
        """See the class docstring; factors/cap apply to the adaptive multipliers."""
        if not stages:
            raise ValueError("Curriculum: stages must not be empty")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Curriculum: stage names must be unique, got {names}")
        if loss_window < 2:
            raise ValueError(f"Curriculum: loss_window must be >= 2, got {loss_window}")
        if max_multiplier < 1.0:
            raise ValueError(f"Curriculum: max_multiplier must be >= 1, got {max_multiplier}")
        self.stages = list(stages)
        self.retention_threshold = retention_threshold
        self.audio_acc_threshold = audio_acc_threshold
        self.loss_cv_threshold = loss_cv_threshold
        self.loss_window = loss_window
        self.adaptive = adaptive
        self.beta_factor, self.alpha_factor = beta_factor, alpha_factor
        self.compound, self.max_multiplier = compound, max_multiplier
        self.index = 0
        self.stage_start_steps: dict[str, int] = {stages[0].name: start_step}
        self._losses: deque[float] = deque(maxlen=loss_window)
        self.retention: float | None = None
        self.audio_accuracy: float | None = None
        self.alpha_multiplier = 1.0
        self.beta_multiplier = 1.0

    # ---- queries -------------------------------------------------------------------------

    @property
    def current(self) -> CurriculumStage:
        """The stage in force."""
        return self.stages[self.index]

    def effective_weights(self) -> LossWeights:
        """The current stage's base weights with the adaptive multipliers applied."""
        base = self.current.weights
        return replace(base, alpha=base.alpha * self.alpha_multiplier,
                       beta=base.beta * self.beta_multiplier)

    def loss_cv(self) -> float | None:
        """Coefficient of variation of the loss window; ``None`` until the window is full."""
        if len(self._losses) < self.loss_window:
            return None
        mean = statistics.fmean(self._losses)
        std = statistics.pstdev(self._losses)
        return 0.0 if std == 0 else (math.inf if mean == 0 else std / abs(mean))

    # ---- inputs --------------------------------------------------------------------------

    def observe_loss(self, step: int, loss: float) -> None:
        """Record a training loss (non-finite ones, i.e. skipped steps, are ignored)."""
        del step  # the window is positional; kept in the signature for symmetry with update
        if math.isfinite(loss):
            self._losses.append(float(loss))

    def update(
        self, step: int, *, retention: float | None = None, audio_accuracy: float | None = None
    ) -> list[Event]:
        """Take new metrics, adapt the weights, maybe advance the stage.

        Args:
            step: current optimizer step (global).
            retention: VL retention score (SAFE accuracy / original accuracy), or ``None``.
            audio_accuracy: audio-visual accuracy on the current stage's data, or ``None``.

        Returns:
            The weight-change and stage-change events, in order (often empty).
        """
        if retention is not None:
            self.retention = float(retention)
        if audio_accuracy is not None:
            self.audio_accuracy = float(audio_accuracy)
        events: list[Event] = []
        if self.adaptive and retention is not None:
            events += self._adapt(step, "beta", self.retention, self.retention_threshold, "retention")
        if self.adaptive and audio_accuracy is not None:
            events += self._adapt(step, "alpha", self.audio_accuracy, self.audio_acc_threshold,
                                  "audio accuracy")
        reason = self._advance_reason(step)
        if reason is not None:
            events.append(self._advance(step, reason))
        return events

    # ---- rules ---------------------------------------------------------------------------

    def _adapt(self, step: int, weight: str, value: float, threshold: float, label: str) -> list[Event]:
        """Recompute one multiplier from its condition; an event if the weight changed."""
        factor = self.beta_factor if weight == "beta" else self.alpha_factor
        old = getattr(self, f"{weight}_multiplier")
        if value < threshold:
            new = min((old if self.compound else 1.0) * factor, self.max_multiplier)
            reason = f"{label} {value:.3f} < {threshold:.2f}: {weight} x{new:.4g}"
        else:
            new = 1.0
            reason = f"{label} {value:.3f} >= {threshold:.2f}: {weight} back to stage base"
        if new == old:
            return []
        before = getattr(self.effective_weights(), weight)
        setattr(self, f"{weight}_multiplier", new)
        after = getattr(self.effective_weights(), weight)
        return [Event("weight_change", step, self.current.name, reason,
                      {"weight": weight, "old": before, "new": after, "multiplier": new})]

    def _advance_reason(self, step: int) -> str | None:
        """Why the current stage should end now, or ``None``."""
        if self.index == len(self.stages) - 1:
            return None
        stage = self.current
        ran = step - self.stage_start_steps[stage.name]
        if ran >= stage.max_steps:
            return f"max_steps reached ({ran} >= {stage.max_steps})"
        if ran < stage.min_steps:
            return None
        cv = self.loss_cv()
        met = (
            self.retention is not None and self.retention >= self.retention_threshold
            and self.audio_accuracy is not None and self.audio_accuracy >= self.audio_acc_threshold
            and cv is not None and cv <= self.loss_cv_threshold
        )
        if not met:
            return None
        return (f"criteria met: retention {self.retention:.3f} >= {self.retention_threshold:.2f}, "
                f"audio accuracy {self.audio_accuracy:.3f} >= {self.audio_acc_threshold:.2f}, "
                f"loss CV {cv:.3f} <= {self.loss_cv_threshold:.2f}")

    def _advance(self, step: int, reason: str) -> Event:
        old = self.current
        ran = step - self.stage_start_steps[old.name]
        self.index += 1
        self.stage_start_steps[self.current.name] = step
        self._losses.clear()
        self.audio_accuracy = None
        self.alpha_multiplier = 1.0
        return Event("stage_change", step, self.current.name, reason,
                     {"from": old.name, "to": self.current.name, "steps_in_stage": ran,
                      "forced": ran >= old.max_steps,  # the step limit, not the progression criteria
                      "audio_ratio": self.current.audio_ratio,
                      "weights": self.effective_weights().to_dict()})

    def begin(self, step: int) -> None:
        """Start the first stage's clock at ``step``: the first curriculum phase's first step (earlier phases
        run without the curriculum, and must not use up its first stage's ``max_steps``)."""
        if self.index != 0:
            raise ValueError(f"Curriculum.begin: already in stage {self.current.name!r}")
        self.stage_start_steps = {self.stages[0].name: int(step)}

    # ---- persistence ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (stage names are stored to check on load)."""
        return {
            "stage_names": [s.name for s in self.stages],
            "index": self.index,
            "stage_start_steps": dict(self.stage_start_steps),
            "losses": list(self._losses),
            "retention": self.retention,
            "audio_accuracy": self.audio_accuracy,
            "alpha_multiplier": self.alpha_multiplier,
            "beta_multiplier": self.beta_multiplier,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: the saved stage names differ from this curriculum's.
        """
        names = [s.name for s in self.stages]
        if state.get("stage_names") != names:
            raise ValueError(
                f"Curriculum.load_state_dict: saved stage_names {state.get('stage_names')} != {names}"
            )
        self.index = int(state["index"])
        self.stage_start_steps = {k: int(v) for k, v in state["stage_start_steps"].items()}
        self._losses = deque((float(x) for x in state["losses"]), maxlen=self.loss_window)
        self.retention = state["retention"]
        self.audio_accuracy = state["audio_accuracy"]
        self.alpha_multiplier = float(state["alpha_multiplier"])
        self.beta_multiplier = float(state["beta_multiplier"])
