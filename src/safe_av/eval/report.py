"""HTML training report from a run folder: ``safe report RUN_DIR``.

Reads ``metrics.jsonl`` (step, eval and event records, schema in ``docs/interfaces.md``) and
``metrics.json`` (final summary) and writes ``report.html`` with PNG plots in ``plots/``.
Anything may be missing or malformed: a plot is drawn only for data that exists, bad lines are
counted and skipped. Figures are made with ``matplotlib.figure.Figure`` (Agg canvas), so the
global pyplot backend is never touched.
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

__all__ = ["RunLog", "read_run_log", "write_report", "main"]

# Summary keys shown first, with their labels; any other scalar of metrics.json follows.
_KEY_METRICS: tuple[tuple[str, str], ...] = (
    ("original_vqa_accuracy", "VQA accuracy, original VL model"),
    ("safe_vqa_accuracy", "VQA accuracy, SAFE"),
    ("vl_retention", "VL retention"),
    ("avqa_accuracy", "AVQA accuracy"),
    ("avqa_chance_accuracy", "AVQA chance accuracy"),
    ("audio_masked_avqa_accuracy", "AVQA accuracy, audio masked"),
    ("audio_shuffled_avqa_accuracy", "AVQA accuracy, audio shuffled"),
    ("avqa_majority_accuracy", "AVQA majority-answer accuracy"),
    ("feature_similarity", "Feature similarity (SAFE vs original)"),
    ("eval_samples", "Questions evaluated / skipped / held out / clips cut"),
    ("phase_starts", "Phase starts"),
    ("skipped_samples", "Skipped samples"),
)
_CARDS = ("vl_retention", "safe_vqa_accuracy", "avqa_accuracy", "audio_masked_avqa_accuracy")
_RETENTION_TARGET = 0.95  # spec: keep >= 95 % of the original VL performance (curriculum.retention_threshold wins)
_CARD_N = {"vl_retention": "vqa", "safe_vqa_accuracy": "vqa", "avqa_accuracy": "avqa",
           "audio_masked_avqa_accuracy": "avqa"}  # which eval_samples count a card's value is over
_DASH = "—"  # a value the run does not have (older runs lack the baseline keys)
_SCENARIO_COLOURS = {"Audio": "#4C72B0", "Visual": "#55A868", "Audio-Visual": "#C44E52", "AV": "#C44E52"}
_PHASE_COLOUR, _STAGE_COLOUR, _WEIGHT_COLOUR = "#444444", "#DD8452", "#8172B3"


@dataclass
class RunLog:
    """The parsed ``metrics.jsonl``: step records, eval records, events, and bad-line count."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run_log(path: Path) -> RunLog:
    """Parse ``metrics.jsonl``; a missing file gives an empty log, bad lines are counted.

    A record with ``event`` is an event; one with any ``eval/`` key is an eval record; one with
    any other numeric key besides ``step``/``epoch`` is a step record (a record may be both).
    """
    log = RunLog()
    if not path.is_file():
        return log
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.bad_lines += 1
                continue
            if not isinstance(rec, dict):
                log.bad_lines += 1
                continue
            if "event" in rec:
                log.events.append(rec)
                continue
            if any(k.startswith("eval/") for k in rec):
                log.evals.append(rec)
            if any(_is_number(v) for k, v in rec.items() if k not in ("step", "epoch") and not k.startswith("eval/")):
                log.steps.append(rec)
    return log


def _read_summary(path: Path) -> tuple[dict[str, Any], str | None]:
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {}, f"metrics.json could not be parsed ({e})"
    if not isinstance(data, dict):
        return {}, "metrics.json is not a JSON object"
    return data, None


def _read_config(path: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as a dict; ``{}`` when missing or unreadable (the report goes on)."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _dig(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``, ``None`` where any level is missing or not a mapping."""
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _wilson(p: Any, n: Any, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score 95 % interval of a proportion ``p`` over ``n`` questions (``None`` without both)."""
    if not (_is_number(p) and _is_number(n)) or n <= 0 or not 0 <= p <= 1:
        return None
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _eval_n(summary: dict[str, Any], kind: str) -> int | None:
    """Questions the final evaluation scored for ``kind`` (``"vqa"``/``"avqa"``), from ``eval_samples``."""
    n = _dig(summary, "eval_samples", kind, "evaluated")
    return int(n) if _is_number(n) else None


def _retention_target(config: dict[str, Any]) -> float:
    t = _dig(config, "curriculum", "retention_threshold")
    return float(t) if _is_number(t) else _RETENTION_TARGET


def _phases(config: dict[str, Any]) -> list[dict[str, Any]]:
    phases = _dig(config, "train", "phases")
    return [p for p in phases if isinstance(p, dict)] if isinstance(phases, list) else []


def _base_changed(phases: list[dict[str, Any]], index: int) -> bool:
    """Whether the base VL model differs from the original during phase ``index``: it or an earlier phase trained
    LoRA, or unfroze base modules with ``base`` in its ``train`` (the trainer's rule: ``unfreeze`` alone trains
    nothing). Trained weights stay changed in the phases after."""
    def changes(phase):
        parts = phase.get("train") if isinstance(phase.get("train"), list) else []
        return "lora" in parts or ("base" in parts and bool(phase.get("unfreeze")))

    return any(changes(p) for p in phases[: index + 1])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if _is_number(v):
            step = r.get("step")
            xs.append(float(step) if _is_number(step) else float(i))
            ys.append(float(v))
    return xs, ys


def _keys(records: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith(prefix) and _is_number(v):
                seen.setdefault(k, None)
    return list(seen)


def _new_axes(title: str, ylabel: str, size: tuple[float, float] = (7.2, 3.4)):
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _event_label(ev: dict[str, Any]) -> str:
    kind = ev.get("event")
    if kind == "phase_start":
        value = ev.get("phase", ev.get("name"))
        return f"phase {value}" if value is not None else "phase start"
    value = next((ev[k] for k in ("stage", "to", "new_stage", "name") if ev.get(k) is not None), None)
    return f"stage {value}" if value is not None else "stage change"


def _mark_events(ax, events: Sequence[dict[str, Any]], *, weights: bool = False) -> None:
    """Vertical lines at phase starts (solid) and stage changes (dashed), one label per step."""
    styles = {"phase_start": (_PHASE_COLOUR, "-"), "stage_change": (_STAGE_COLOUR, "--")}
    if weights:
        styles["weight_change"] = (_WEIGHT_COLOUR, ":")
    labels: dict[float, list[str]] = {}
    colours: dict[float, str] = {}
    for ev in events:
        kind, step = ev.get("event"), ev.get("step")
        if kind not in styles or not _is_number(step):
            continue
        colour, style = styles[kind]
        ax.axvline(step, color=colour, linestyle=style, linewidth=1.0, alpha=0.8, zorder=1)
        if kind != "weight_change":
            labels.setdefault(step, []).append(_event_label(ev))
            if kind == "phase_start" or step not in colours:
                colours[step] = colour
    for step, texts in labels.items():
        ax.text(
            step,
            0.98,
            " · ".join(dict.fromkeys(texts)),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7.5,
            color=colours[step],
            zorder=3,
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=1.0),
        )


def _maybe_log_scale(ax, values: Sequence[float]) -> None:
    """Log scale when the positive values span more than two decades; symlog (linear below the smallest
    positive value) when zeros are among them, so a term that is 0 in some phases (the Fisher penalty before
    phase 3) does not force a linear axis where the small terms lie flat on zero."""
    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) <= 100 or any(v < 0 for v in values):
        return
    if len(positive) == len(values):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=min(positive))


def _line_plot(
    path: Path,
    title: str,
    ylabel: str,
    curves: dict[str, tuple[list[float], list[float]]],
    events: Sequence[dict[str, Any]],
    *,
    markers: bool = False,
    log_ok: bool = True,
    weights: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
    from_zero: bool = False,
) -> bool:
    """A time-series figure; ``hlines``: labelled horizontal reference lines (value, label); ``from_zero``: the
    y axis runs from 0 (or below, to show a line) to a little above the largest value or line."""
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return False
    fig, ax = _new_axes(title, ylabel)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, linewidth=1.4, marker="o" if markers or len(xs) == 1 else None, markersize=3.5)
    values = [y for _, ys in curves.values() for y in ys]
    if log_ok:
        _maybe_log_scale(ax, values + [y for y, _ in hlines if y > 0])
    for y, label in hlines:
        ax.axhline(y, color="#cf222e", linestyle="--", linewidth=1.1, alpha=0.9, zorder=1.5, label=label)
    if from_zero:
        everything = values + [y for y, _ in hlines]
        low, high = min(0.0, *everything), max(everything)
        ax.set_ylim(low, high + 0.06 * max(high - low, 1e-9))
    _mark_events(ax, events, weights=weights)
    ax.set_xlabel("step")
    if len(curves) > 1 or hlines:
        ax.legend(fontsize=8, frameon=False, loc="best")
    fig.savefig(path)
    return True


def _table_of(raw: Any) -> dict[str, float]:
    """A per-type dict of metrics.json as ``{type: number}``; the full avqa_accuracy() result may have been stored:
    its official ``table`` (or ``by_type``) is used then. Non-numbers (a type without questions) are left out."""
    if not isinstance(raw, dict):
        return {}
    if isinstance(raw.get("table"), dict):
        raw = raw["table"]
    elif isinstance(raw.get("by_type"), dict):
        raw = raw["by_type"]
    return {str(k): float(v) for k, v in raw.items() if _is_number(v)}


def _by_type_values(summary: dict[str, Any]) -> dict[str, float]:
    """AVQA accuracy per type from metrics.json (the final evaluation; eval records during training hold no
    per-type accuracy)."""
    return _table_of(summary.get("avqa_accuracy_by_type"))


# Per-type columns of metrics.json besides SAFE's accuracy (older runs have none of them).
_BY_TYPE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("audio_masked_avqa_accuracy_by_type", "audio removed"),
    ("audio_shuffled_avqa_accuracy_by_type", "audio shuffled"),
    ("avqa_chance_by_type", "chance"),
    ("avqa_majority_by_type", "majority"),
)


def _n_by_type(summary: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in _table_of(summary.get("avqa_n_by_type")).items()}


def _scenario_of(label: str) -> str:
    head = label.replace("/", " ").split()[0] if label.strip() else ""
    return {"AV": "Audio-Visual"}.get(head, head)


def _bar_plot(path: Path, values: dict[str, float], summary: dict[str, Any]) -> bool:
    """SAFE's accuracy per type, Wilson 95 % CI whiskers and the type's own chance / majority as ticks on each
    bar (where the run stored them; an older run gets one overall chance line, said so in its label)."""
    if not values:
        return False
    labels = list(values)
    height = [values[k] for k in labels]
    ns = _n_by_type(summary)
    chance = _table_of(summary.get("avqa_chance_by_type"))
    major = _table_of(summary.get("avqa_majority_by_type"))
    fig, ax = _new_axes("AVQA accuracy per question type", "accuracy", size=(8.4, 4.4))
    colours = [_SCENARIO_COLOURS.get(_scenario_of(k), "#8C8C8C") for k in labels]
    is_avg = ["avg" in k.lower() or k.lower() == "overall" for k in labels]
    xs = list(range(len(labels)))
    ax.bar(xs, height, color=colours, edgecolor="#333333", linewidth=[1.2 if a else 0 for a in is_avg],
           alpha=0.85, zorder=2)
    cis = [_wilson(v, ns.get(k)) for k, v in zip(labels, height)]
    with_ci = [i for i, ci in enumerate(cis) if ci is not None]
    if with_ci:
        ax.errorbar([xs[i] for i in with_ci], [height[i] for i in with_ci],
                    yerr=[[height[i] - cis[i][0] for i in with_ci], [cis[i][1] - height[i] for i in with_ci]],
                    fmt="none", ecolor="#333333", elinewidth=1.0, capsize=3, zorder=3, label="Wilson 95% CI")
    for x, k, v, ci in zip(xs, labels, height, cis):
        ax.annotate(f"{v:.2f}", (x, ci[1] if ci else v), xytext=(0, 2), textcoords="offset points", ha="center",
                    fontsize=7, zorder=4)
    for table, label, style, colour in ((chance, "chance (type's own)", "-", "#000000"),
                                        (major, "majority (type's own)", (0, (2, 1)), "#777777")):
        points = [(x, table[k]) for x, k in zip(xs, labels) if k in table]
        if points:
            ax.hlines([y for _, y in points], [x - 0.42 for x, _ in points], [x + 0.42 for x, _ in points],
                      colors=colour, linestyles=style, linewidth=2.0, zorder=4, label=label)
    if not chance and _is_number(summary.get("avqa_chance_accuracy")):
        v = summary["avqa_chance_accuracy"]
        ax.axhline(v, color="#333333", linestyle=":", linewidth=1.0,
                   label=f"overall chance {v:.2f} (no per-type chance)")
    ticks = [k.replace("Audio-Visual/", "AV/") + (f"\nn={ns[k]}" if k in ns else "") for k in labels]
    ax.set_xticks(xs, ticks, rotation=40, ha="right", fontsize=7.5)
    if max(height) <= 1.0:
        ax.set_ylim(0, 1.2)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, frameon=False, loc="upper center", ncols=4, bbox_to_anchor=(0.5, 1.0))
    fig.savefig(path)
    return True


def _numeric_keys(prefix: str) -> Callable[[Sequence[dict[str, Any]]], list[str]]:
    return lambda records: _keys(records, prefix)


def _sorted_first(prefix: str, first: str) -> Callable[[Sequence[dict[str, Any]]], list[str]]:
    return lambda records: sorted(_keys(records, prefix), key=lambda k: (k != first, k))


def _lr_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    return _keys(records, "lr/") + (["lr"] if any(_is_number(r.get("lr")) for r in records) else [])


@dataclass(frozen=True)
class _LinePlot:
    """One time-series figure: which keys, from step or eval records, and how to draw them."""

    name: str
    title: str
    ylabel: str
    caption: str
    keys: Callable[[Sequence[dict[str, Any]]], list[str]]
    strip: str = ""  # prefix removed in the legend
    from_evals: bool = False
    log_ok: bool = True  # log y-scale allowed when the values span > 2 decades
    markers: bool = False
    weights: bool = False  # also mark weight_change events


_PHASES = "solid lines: phase starts, dashed: curriculum stage changes"
_LINE_PLOTS = (
    _LinePlot("losses.png", "Loss per component", "loss", f"Training loss per component; {_PHASES}.",
              _sorted_first("loss/", "loss/total"), "loss/"),
    _LinePlot("loss_weights.png", "Loss weights", "weight",
              "Loss-combination weights; dotted lines: weight changes (see the events table).",
              _numeric_keys("weights/"), "weights/", log_ok=False, weights=True),
    _LinePlot("audio_ratio.png", "Audio ratio", "fraction",
              "Target fraction of audio-bearing samples (audio_ratio) and the fraction the step's batches held "
              "(audio_fraction: rounding per batch, clips that failed to load, or data without audio-free samples).",
              lambda r: _keys(r, "audio_ratio") + _keys(r, "audio_fraction"), log_ok=False),
    _LinePlot("retention.png", "Retention and accuracy (eval)", "value", "Evaluation records over training.",
              _sorted_first("eval/", "eval/vl_retention"), "eval/", from_evals=True, log_ok=False, markers=True),
    _LinePlot("grad_norm.png", "Gradient norm", "norm", "Global gradient norm.", lambda r: _keys(r, "grad_norm")),
    _LinePlot("learning_rates.png", "Learning rates", "lr", "Learning rate per parameter group.", _lr_keys, "lr/"),
    _LinePlot("param_drift.png", "Parameter drift", "L2 distance",
              "L2 distance of the anchored base parameters (the base modules a phase unfreezes) from their "
              "original values, over all of them together; 0 while no base module is unfrozen. LoRA weights, "
              "projector and fusion are not included.",
              lambda r: _keys(r, "param_drift"), log_ok=False),
    _LinePlot("throughput.png", "Throughput", "samples / s", "Training samples per second.",
              lambda r: _keys(r, "samples_per_s"), log_ok=False),
    _LinePlot("memory.png", "Peak memory", "MB",
              "Peak memory so far (a running maximum): on a GPU torch.cuda.max_memory_allocated (tensors only); "
              "on CPU the process's peak resident set size (ru_maxrss: everything the process holds, libraries "
              "and data included).",
              lambda r: _keys(r, "peak_memory_mb"), log_ok=False),
)  # fmt: skip
_BAR_CAPTION = (
    "SAFE's accuracy per question type on the final evaluation (exact match); whiskers: Wilson 95% CI over the "
    "type's n questions (in the tick label). Black ticks: the type's own chance (uniform guess among the answers "
    "seen for the type in training), grey dashed ticks: its majority answer. Colour by scenario (blue audio, green "
    "visual, red audio-visual); outlined bars are pooled averages (per question)."
)


def _retention_caption(config: dict[str, Any]) -> str:
    n = _dig(config, "curriculum", "eval_samples")
    split = _dig(config, "data", "select_split") or _dig(config, "data", "eval_split")
    subset = f"the first {n}" if _is_number(n) else "a subset of the"
    parts = [
        f"Evaluations during training, on the {split or 'evaluation'} split. vl_retention: SAFE's VQA accuracy over "
        f"the original model's, on {subset} VQA evaluation questions (those whose image loads); "
        f"stage_audio_accuracy: exact-match accuracy on up to {n if _is_number(n) else 'N'} audio-dependent AVQA "
        "evaluation questions of the current stage's difficulties. Dashed red line: the retention target."
    ]
    phases = _phases(config)
    frozen = [f"phase {i + 1} ({p.get('name', '?')})" for i, p in enumerate(phases) if not _base_changed(phases, i)]
    if frozen:
        parts.append(
            f"While nothing in the base model trains ({', '.join(frozen)}), retention is 1 by construction: VQA "
            "inputs carry no audio, so SAFE answers exactly as the original model."
        )
    parts.append(_PHASES + ".")
    return " ".join(parts)


def _make_plots(run_dir: Path, log: RunLog, summary: dict[str, Any],
                config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Draw every plot that has data. Returns (file name, title, caption) per plot drawn."""
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    for stale in plots_dir.glob("*.png"):  # a rerun must not show plots whose data vanished
        stale.unlink()
    target = _retention_target(config)
    clip = _dig(config, "train", "optim", "grad_clip")
    extras: dict[str, dict[str, Any]] = {
        "retention.png": dict(hlines=[(target, f"retention target {target:g}")], from_zero=True),
        "audio_ratio.png": dict(from_zero=True),
        "grad_norm.png": dict(hlines=[(float(clip), f"clip at {clip:g}")] if _is_number(clip) and clip > 0 else []),
    }
    captions = {"retention.png": _retention_caption(config)}
    if extras["grad_norm.png"]["hlines"]:
        captions["grad_norm.png"] = (f"Global gradient norm before clipping; dashed red line: the clip value "
                                     f"(train.optim.grad_clip = {clip:g}). {_PHASES}.")
    drawn = []
    for spec in _LINE_PLOTS:
        records = log.evals if spec.from_evals else log.steps
        curves = {k.removeprefix(spec.strip): _series(records, k) for k in spec.keys(records)}
        kwargs = dict(markers=spec.markers, log_ok=spec.log_ok, weights=spec.weights, **extras.get(spec.name, {}))
        if _line_plot(plots_dir / spec.name, spec.title, spec.ylabel, curves, log.events, **kwargs):
            drawn.append((spec.name, spec.title, captions.get(spec.name, spec.caption)))
        if spec.name == "retention.png" and _bar_plot(
            plots_dir / "avqa_by_type.png", _by_type_values(summary), summary
        ):
            drawn.append(("avqa_by_type.png", "AVQA accuracy per question type", _BAR_CAPTION))
    return drawn


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --accent:#0969da; --ok:#1a7f37; --bad:#cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header .meta { color: #c9d1d9; font-size: 12px; margin-top: 4px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 40px; }
h2 { font-size: 16px; margin: 28px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; margin-top: 20px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; background: var(--bg); }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 26px; font-weight: 600; margin-top: 2px; }
.card .note { font-size: 12px; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .muted { color: var(--muted); }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
table.kv { max-width: 760px; } table.kv td:first-child { width: 60%; }
table.sub { width: auto; margin: 0; } table.sub td { padding: 2px 10px; border: 0; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px;
      margin: 0; white-space: pre-wrap; word-break: break-word; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 10px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 6px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: var(--bg);
         border: 1px solid var(--line); }
details summary { cursor: pointer; color: var(--accent); }
table.baseline, table.by-type { width: auto; } dl.defs dd { margin: 0 0 6px 16px; color: var(--fg); }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; }
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e6):
            return f"{v:.3e}"
        # a fixed 3 decimals (fractions, losses, weights alike), so values in a column or a row compare
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def _frac(v: Any) -> str:
    """A fraction with a fixed 3 decimals; the dash for a value the run does not have."""
    return f"{float(v):.3f}" if _is_number(v) else _DASH


def _ci_text(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _value_cell(v: Any) -> str:
    if _is_number(v) or isinstance(v, bool):
        return f'<td class="num">{_esc(_fmt(v))}</td>'
    scalar = (int, float, str, bool, type(None))
    if isinstance(v, dict) and v and all(isinstance(x, scalar) for x in v.values()):
        rows = "".join(f"<tr><td>{_esc(k)}</td><td class='num'>{_esc(_fmt(x))}</td></tr>" for k, x in v.items())
        return f"<td><table class='sub'>{rows}</table></td>"
    if isinstance(v, list) and all(isinstance(x, scalar) for x in v):
        return f"<td>{_esc(', '.join(_fmt(x) for x in v))}</td>"
    if isinstance(v, (dict, list)):
        return f"<td><pre>{_esc(json.dumps(v, indent=1, default=str))}</pre></td>"
    return f"<td>{_esc(v)}</td>"


def _cards_html(summary: dict[str, Any], config: dict[str, Any]) -> str:
    """Headline numbers with the number of questions behind them and, for accuracies, a Wilson 95 % CI."""
    labels = dict(_KEY_METRICS)
    target = _retention_target(config)
    cards = []
    for key in _CARDS:
        v = summary.get(key)
        if not _is_number(v):
            continue
        n = _eval_n(summary, _CARD_N[key])
        notes = []
        if key == "vl_retention":
            if n is not None:
                notes.append(f'<div class="note muted">n = {n:,} VQA questions</div>')
            if 0 <= v <= 1.5:
                ok = v >= target
                verdict = f"{'met' if ok else 'missed'} (point estimate)"
                notes.append(f'<div class="note {"ok" if ok else "bad"}">target ≥ {target:.2f}: {verdict}</div>')
            ci = _wilson(summary.get("safe_vqa_accuracy"), n)
            orig = summary.get("original_vqa_accuracy")
            if ci and _is_number(orig) and orig > 0:
                notes.append(f'<div class="note muted">SAFE VQA 95% CI ÷ original: {ci[0] / orig:.3f}–'
                             f"{ci[1] / orig:.3f} (original taken as exact)</div>")
        elif n is not None:
            ci = _wilson(v, n)
            approx = " (approx. for the soft VQA score)" if key == "safe_vqa_accuracy" else ""
            notes.append(f'<div class="note muted">n = {n:,} · Wilson 95% CI {_ci_text(ci)}{approx}</div>')
        else:
            notes.append('<div class="note muted">n unknown (no eval_samples in metrics.json)</div>')
        cards.append(
            f'<div class="card"><div class="label">{_esc(labels[key])}</div>'
            f'<div class="value">{_esc(_frac(v))}</div>{"".join(notes)}</div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _baseline_html(summary: dict[str, Any]) -> str:
    """AVQA: SAFE against its own audio ablations and the answer-prior baselines, on the same questions."""
    rows_spec = (
        ("All AVQA questions", "avqa_accuracy", "audio_masked_avqa_accuracy", "audio_shuffled_avqa_accuracy",
         "avqa_chance_accuracy", "avqa_majority_accuracy"),
        ("Audio-dependent (Audio, Audio-Visual)", "audio_dependent_accuracy", "audio_masked_audio_dependent_accuracy",
         "audio_shuffled_audio_dependent_accuracy", "audio_dependent_chance_accuracy",
         "audio_dependent_majority_accuracy"),
    )
    if not any(_is_number(summary.get(k)) for row in rows_spec for k in row[1:]):
        return ""
    ns = _n_by_type(summary)
    dep_n = ns["Audio (avg)"] + ns["AV (avg)"] if "Audio (avg)" in ns and "AV (avg)" in ns else None
    row_n = (_eval_n(summary, "avqa"), dep_n)
    rows = []
    for (label, *keys), n in zip(rows_spec, row_n):
        safe = summary.get(keys[0])
        ci = _ci_text(_wilson(safe, n))
        cells = [f"<td class='num'>{_esc(_frac(safe))} <span class='muted'>{_esc(ci)}</span></td>"]
        cells += [f"<td class='num'>{_esc(_frac(summary.get(k)))}</td>" for k in keys[1:]]
        cells.append(f"<td class='num'>{_esc(f'{n:,}' if n is not None else _DASH)}</td>")
        rows.append(f"<tr><td>{_esc(label)}</td>{''.join(cells)}</tr>")
    head = ("<tr><th>AVQA questions</th><th>SAFE [Wilson 95% CI]</th><th>audio removed</th><th>audio shuffled</th>"
            "<th>chance</th><th>majority</th><th>n</th></tr>")
    note = ("<p class='muted'>All columns are scored on the same loaded questions. Audio removed: the audio tokens "
            "are dropped; audio shuffled: every question gets another video's clip; chance / majority: see the "
            "definitions below.</p>")
    return f"<table class='baseline'>{head}{''.join(rows)}</table>{note}"


def _summary_html(summary: dict[str, Any], problem: str | None, config: dict[str, Any]) -> str:
    if problem:
        return f'<p class="bad">{_esc(problem)}</p>'
    if not summary:
        return '<p class="muted">No <code>metrics.json</code> in this run (training not finished?).</p>'
    rows = []
    labels = dict(_KEY_METRICS)
    # the per-type dicts are the per-type table's columns (below the plots), not repeated here
    shown = {k: v for k, v in summary.items() if not (k.endswith("_by_type") and _table_of(v))}
    ordered = [k for k, _ in _KEY_METRICS if k in shown] + sorted(k for k in shown if k not in labels)
    for key in ordered:
        label = labels.get(key, key)
        value = summary[key]
        cell = _phase_starts_cell(value, config) if key == "phase_starts" else _value_cell(value)
        rows.append(f"<tr><td>{_esc(label)}<br><code class='muted'>{_esc(key)}</code></td>{cell}</tr>")
    return f"<table class='kv'><tr><th>Metric</th><th>Value</th></tr>{''.join(rows)}</table>"


def _phase_starts_cell(value: Any, config: dict[str, Any]) -> str:
    """``phase_starts`` is stored with 0-based phase indices; shown 1-based with the phase names, as elsewhere."""
    if not isinstance(value, dict):
        return _value_cell(value)
    names = [p.get("name") for p in _phases(config)]
    lines = []
    for key, step in value.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            return _value_cell(value)
        name = names[index] if 0 <= index < len(names) and names[index] else None
        lines.append(f"phase {index + 1}{f' ({name})' if name else ''}: step {_fmt(step)}")
    return f"<td>{'<br>'.join(_esc(x) for x in lines)}</td>"


def _training_html(log: RunLog) -> str:
    steps = [r["step"] for r in log.steps if _is_number(r.get("step"))]
    last_loss = next((r["loss/total"] for r in reversed(log.steps) if _is_number(r.get("loss/total"))), None)
    skipped = sum(1 for e in log.events if e.get("event") == "skipped_step")
    facts = [
        ("Step records", len(log.steps)),
        ("Last step", int(max(steps)) if steps else "–"),
        ("Final total loss", last_loss if last_loss is not None else "–"),
        ("Eval records", len(log.evals)),
        ("Events", len(log.events)),
        ("Skipped steps", skipped),
    ]
    if log.bad_lines:
        facts.append(("Unreadable log lines (skipped)", log.bad_lines))
    cells = "".join(f"<tr><td>{_esc(k)}</td>{_value_cell(v)}</tr>" for k, v in facts)
    return f"<table class='kv'>{cells}</table>"


def _event_rows(events: Sequence[dict[str, Any]]) -> str:
    rows = []
    for ev in events:
        details = ", ".join(
            f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else _fmt(v)}"
            for k, v in ev.items()
            if k not in ("event", "step", "reason")
        )
        step = ev.get("step")
        rows.append(
            f"<tr><td class='num'>{_esc(_fmt(step) if step is not None else '–')}</td>"
            f"<td><span class='badge'>{_esc(ev.get('event'))}</span></td>"
            f"<td><code>{_esc(details)}</code></td><td>{_esc(ev.get('reason', ''))}</td></tr>"
        )
    return "<table><tr><th>Step</th><th>Event</th><th>Details</th><th>Reason</th></tr>" + "".join(rows) + "</table>"


def _events_html(events: Sequence[dict[str, Any]]) -> str:
    main_events = [e for e in events if e.get("event") != "skipped_step"]
    skipped = [e for e in events if e.get("event") == "skipped_step"]
    parts = [
        _event_rows(main_events) if main_events else '<p class="muted">No phase, stage or weight events logged.</p>'
    ]
    if skipped:
        shown = skipped[:200]
        more = f" (first {len(shown)} shown)" if len(skipped) > len(shown) else ""
        parts.append(f"<details><summary>{len(skipped)} skipped steps{more}</summary>{_event_rows(shown)}</details>")
    return "".join(parts)


def _stage_timeline_html(summary: dict[str, Any], events: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """The curriculum's stages in order: start and end step, steps spent, audio ratio and why each one ended
    (a met progression criterion, or ``max_steps`` reached), from ``curriculum_stages`` and the stage events."""
    starts = summary.get("curriculum_stages")
    if not isinstance(starts, dict) or not starts:
        return '<p class="muted">No curriculum in this run (or no metrics.json yet).</p>'
    try:
        order = sorted(((int(v), str(k)) for k, v in starts.items() if _is_number(v)))
    except (TypeError, ValueError):
        return '<p class="muted">curriculum_stages could not be read.</p>'
    changes = {str(e.get("from")): e for e in events if e.get("event") == "stage_change"}
    ratios = {str(s.get("name")): s.get("audio_ratio") for s in (_dig(config, "curriculum", "stages") or [])
              if isinstance(s, dict)}
    ratios.update({str(e.get("to")): e.get("audio_ratio") for e in events if e.get("event") == "stage_change"})
    # the curriculum's phases end where the phase after the last of them starts, else at the run's last step
    last = summary.get("steps") if _is_number(summary.get("steps")) else None
    phases = _phases(config)
    with_curriculum = [i for i, p in enumerate(phases) if p.get("curriculum")]
    starts_by_phase = summary.get("phase_starts") if isinstance(summary.get("phase_starts"), dict) else {}
    if with_curriculum and _is_number(starts_by_phase.get(str(with_curriculum[-1] + 1))):
        last = int(starts_by_phase[str(with_curriculum[-1] + 1)])
    rows = []
    for i, (start, name) in enumerate(order):
        change = changes.get(name)
        if i + 1 < len(order):
            end, why = order[i + 1][0], (change or {}).get("reason", "")
        else:
            end, why = last, "still in this stage when the curriculum's phases ended"
        steps = end - start if _is_number(end) else None
        rows.append(f"<tr><td>{_esc(name)}</td><td>{start}</td><td>{_esc(end if end is not None else '—')}</td>"
                    f"<td>{_esc(steps if steps is not None else '—')}</td><td>{_esc(_fmt(ratios.get(name)))}</td>"
                    f"<td>{_esc(why)}</td></tr>")
    def forced(change):  # runs from before the event's "forced" flag: its reason says so
        return bool(change.get("forced", "max_steps reached" in str(change.get("reason", ""))))

    n_forced = sum(forced(changes.get(n) or {}) for _, n in order)
    note = (f'<p class="muted">{n_forced} of {len(order) - 1} stage changes came from reaching the stage\'s step limit '
            "rather than its progression criteria (retention, audio accuracy, loss stability).</p>"
            if len(order) > 1 else "")
    return ("<table><tr><th>stage</th><th>start step</th><th>end step</th><th>steps</th><th>audio ratio</th>"
            "<th>why it ended</th></tr>" + "".join(rows) + "</table>" + note)


def _by_type_table(summary: dict[str, Any]) -> str:
    """Per type: n, SAFE (with its Wilson 95 % CI), audio removed, audio shuffled, chance, majority."""
    values = _by_type_values(summary)
    if not values:
        return ""
    ns = _n_by_type(summary)
    columns = [_table_of(summary.get(key)) for key, _ in _BY_TYPE_COLUMNS]
    rows = []
    for k, v in values.items():
        n = ns.get(k)
        ci = _ci_text(_wilson(v, n))
        cells = [f"<td class='num'>{_esc(f'{n:,}' if n is not None else _DASH)}</td>",
                 f"<td class='num'>{_esc(_frac(v))} <span class='muted'>{_esc(ci)}</span></td>"]
        cells += [f"<td class='num'>{_esc(_frac(col.get(k)))}</td>" for col in columns]
        rows.append(f"<tr><td>{_esc(k)}</td>{''.join(cells)}</tr>")
    head = ("<tr><th>Type</th><th>n</th><th>SAFE [Wilson 95% CI]</th>"
            + "".join(f"<th>{_esc(label)}</th>" for _, label in _BY_TYPE_COLUMNS) + "</tr>")
    missing = "" if all(columns) else (f"<p class='muted'>{_DASH}: not in this run's metrics.json (written by an "
                                       "older version, or no such questions).</p>")
    return f"<h2>AVQA per question type</h2><table class='by-type'>{head}{''.join(rows)}</table>{missing}"


def _adapter_params(path: Path) -> dict[str, int] | None:
    """Parameter counts of ``adapter.safetensors`` per part, from the file's header alone (shapes; no tensor is
    read, no model built): ``None`` when the file is missing or not a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (OSError, SafetensorError):
        return None
    parts: dict[str, int] = {}
    for name, shape in shapes.items():
        if "lora_" in name:
            part = "LoRA"
        elif name.startswith("base."):
            part = "unfrozen base modules"
        else:
            part = name.split(".")[0]
        parts[part] = parts.get(part, 0) + math.prod(int(d) for d in shape)
    return parts


def _setup_html(run_dir: Path, config: dict[str, Any]) -> str:
    """What was trained on what: models, data, evaluation split, phases (config.yaml), adapter size."""
    parts = []
    if config:
        synthetic = _dig(config, "data", "synthetic")
        root = _dig(config, "data", "root")
        split = _dig(config, "data", "eval_split")
        select, vqa_split = _dig(config, "data", "select_split"), _dig(config, "data", "vqa_eval_split")
        facts = [
            ("Base VL model (model.base)", _dig(config, "model", "base")),
            ("Audio encoder (model.audio_encoder)", _dig(config, "model", "audio_encoder")),
            ("Data root (data.root)", f"{root} ({'synthetic data' if synthetic else 'real data'})"
             if synthetic is not None else root),
            ("Final AVQA split (data.eval_split)" if select is not None else "Evaluation split (data.eval_split)",
             split),
        ]
        if select is not None:
            facts += [("Final VQA split (data.vqa_eval_split)", vqa_split),
                      ("Split of the evaluations during training (data.select_split)", select)]
        cells = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v if v is not None else _DASH)}</td></tr>" for k, v in facts)
        parts.append(f"<table class='kv'>{cells}</table>")
        if select is None:  # a run from before data.select_split: one split served both
            parts.append(
                f"<p>The final metrics (metrics.json, the cards and tables) are measured on the "
                f"<code>{_esc(split or '?')}</code> split: the same split the curriculum's stage evaluations "
                "(retention, stage audio accuracy) used during training to decide stage changes. They are not "
                "an untouched test set.</p>"
            )
        else:
            shared = [f"{name} ({_esc(sp)})" for name, sp in (("VQA", vqa_split), ("AVQA", split)) if sp == select]
            parts.append(
                f"<p>The training's own evaluations (retention tracking, the curriculum's stage audio accuracy) "
                f"read the <code>{_esc(select)}</code> split. "
                + (f"The final metrics of {' and '.join(shared)} come from that split too, without every image and "
                   "video those evaluations read (metrics.json: <code>eval_samples.*.held_out</code>), so"
                   if shared else "The final metrics come from other splits, so")
                + " no final number was measured on questions the training chose on.</p>"
            )
        rows = []
        for i, ph in enumerate(_phases(config), 1):
            def listed(v):
                return ", ".join(str(x) for x in v) if isinstance(v, list) and v else _DASH
            ds = ph.get("datasets")
            datasets = ", ".join(f"{k} {_fmt(w)}" for k, w in ds.items()) if isinstance(ds, dict) and ds else _DASH
            steps = ph.get("max_steps")
            rows.append(
                f"<tr><td class='num'>{i}</td><td>{_esc(ph.get('name', _DASH))}</td><td>{_esc(listed(ph.get('train')))}"
                f"</td><td>{_esc(listed(ph.get('unfreeze')))}</td><td>{_esc(datasets)}</td>"
                f"<td class='num'>{_esc(_fmt(steps) if steps is not None else _DASH)}</td>"
                f"<td>{_esc(_fmt(bool(ph.get('curriculum'))))}</td></tr>"
            )
        if rows:
            head = ("<tr><th>Phase</th><th>Name</th><th>Trains</th><th>Unfrozen base modules</th>"
                    "<th>Datasets (weight)</th><th>max_steps</th><th>Curriculum</th></tr>")
            parts.append(f"<table>{head}{''.join(rows)}</table>")
    else:
        parts.append('<p class="muted">No readable <code>config.yaml</code> in this run.</p>')
    counts = _adapter_params(run_dir / "adapter" / "adapter.safetensors")
    if counts:
        detail = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        parts.append(f"<p>Adapter (<code>adapter/adapter.safetensors</code>): {sum(counts.values()):,} parameters "
                     f"({_esc(detail)}).</p>")
    elif (run_dir / "adapter").exists():
        parts.append('<p class="muted">adapter/adapter.safetensors missing or unreadable.</p>')
    return "".join(parts)


def _definitions_html(config: dict[str, Any]) -> str:
    n = _dig(config, "curriculum", "eval_samples")
    items = (
        ("VQA accuracy", "the official VQA v2 soft score of each answer, min(#matching references / 3, 1) "
         "averaged over the 10 leave-one-reference-out subsets, averaged over the questions."),
        ("VL retention", "SAFE's VQA accuracy / the original VL model's, on the same questions (final: every loaded "
         "question of the final VQA split, without the images the training evaluated on; during training: the "
         f"first {n if _is_number(n) else 'N'} VQA questions of the selection split)."),
        ("Feature similarity", "cosine similarity of SAFE's (audio off) and the original model's last hidden "
         "states for the same VQA inputs, averaged over the non-padding token positions of each batch of 16 and "
         "then over batches, on the first 64 loaded VQA evaluation questions, in eval mode."),
        ("AVQA accuracy", "exact match of the normalised answer (lower case, punctuation removed); groups "
         "(avg, Overall) pool the questions, as the official MUSIC-AVQA table."),
        ("Audio removed / shuffled", "the same questions with the audio tokens dropped / with another video's "
         "clip."),
        ("Chance / majority", "from the training answers of the same question type: chance = expected accuracy of "
         "a uniform guess among the answers seen for the type (0 when the right answer was never seen); majority "
         "= accuracy of always giving the type's most frequent answer."),
        ("Wilson 95% CI", "score interval of a proportion over n questions (for the soft VQA score an "
         "approximation)."),
    )
    body = "".join(f"<dt><b>{_esc(k)}</b></dt><dd>{_esc(v)}</dd>" for k, v in items)
    return f"<h2>Metric definitions</h2><dl class='defs'>{body}</dl>"


def _render(run_dir: Path, log: RunLog, summary: dict[str, Any], problem: str | None, plots,
            config: dict[str, Any]) -> str:
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    has_config = (run_dir / "config.yaml").is_file()
    config_link = ' · <a style="color:#c9d1d9" href="config.yaml">config.yaml</a>' if has_config else ""
    if plots:
        figures = "".join(
            f'<figure><img src="plots/{_esc(name)}" alt="{_esc(title)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
            for name, title, caption in plots
        )
        plots_html = f'<div class="grid">{figures}</div>'
    else:
        plots_html = '<p class="muted">Nothing to plot: the log has no numeric records yet.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SAFE report · {_esc(run_dir.name)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>SAFE training report · {_esc(run_dir.name)}</h1>
<div class="meta">Generated {_esc(when)} from <code>metrics.jsonl</code> and <code>metrics.json</code>{config_link}
</div></header>
<main>
{_cards_html(summary, config)}
<h2>Setup</h2>
{_setup_html(run_dir, config)}
<h2>Summary (metrics.json)</h2>
{_baseline_html(summary)}
{_summary_html(summary, problem, config)}
<h2>Training log</h2>
{_training_html(log)}
<h2>Curriculum stages</h2>
{_stage_timeline_html(summary, log.events, config)}
<h2>Phase, stage and weight changes</h2>
{_events_html(log.events)}
<h2>Plots</h2>
{plots_html}
{_by_type_table(summary)}
{_definitions_html(config)}
<footer>Metric definitions: docs/metrics.md · safe_av.eval.report</footer>
</main>
</body>
</html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and ``run_dir/plots/*.png`` from the run's metric files.

    Args:
        run_dir: A training run folder (``metrics.jsonl`` and/or ``metrics.json`` inside; both
            optional, the report then says what is missing).

    Returns:
        Path of the written ``report.html``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    log = read_run_log(run_dir / "metrics.jsonl")
    summary, problem = _read_summary(run_dir / "metrics.json")
    config = _read_config(run_dir / "config.yaml")
    plots = _make_plots(run_dir, log, summary, config)
    out = run_dir / "report.html"
    out.write_text(_render(run_dir, log, summary, problem, plots, config), encoding="utf-8")
    return out


def main(run_dir: str | Path) -> int:
    """CLI entry for ``safe report RUN_DIR``: write the report, print its path; 0 on success."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not any((run_dir / f).is_file() for f in ("metrics.jsonl", "metrics.json")):
        print(f"safe report: {run_dir} has neither metrics.jsonl nor metrics.json: not a training run folder",
              file=sys.stderr)
        return 2
    try:
        path = write_report(run_dir)
    except FileNotFoundError as e:
        print(f"safe report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
