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
    ("skipped_samples", "Skipped samples"),
)
_CARDS = ("vl_retention", "safe_vqa_accuracy", "avqa_accuracy", "audio_masked_avqa_accuracy")
_RETENTION_TARGET = 0.95  # spec: keep >= 95 % of the original VL performance
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
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


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
) -> bool:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return False
    fig, ax = _new_axes(title, ylabel)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, linewidth=1.4, marker="o" if markers or len(xs) == 1 else None, markersize=3.5)
    if log_ok:
        _maybe_log_scale(ax, [y for _, ys in curves.values() for y in ys])
    _mark_events(ax, events, weights=weights)
    ax.set_xlabel("step")
    if len(curves) > 1:
        ax.legend(fontsize=8, frameon=False, loc="best")
    fig.savefig(path)
    return True


def _by_type_values(summary: dict[str, Any]) -> dict[str, float]:
    """AVQA accuracy per type from metrics.json (the final evaluation; eval records during training hold no
    per-type accuracy)."""
    raw = summary.get("avqa_accuracy_by_type")
    if not isinstance(raw, dict):
        return {}
    # The full avqa_accuracy() result may have been stored: use its official table.
    if isinstance(raw.get("table"), dict):
        raw = raw["table"]
    elif isinstance(raw.get("by_type"), dict):
        raw = raw["by_type"]
    return {str(k): float(v) for k, v in raw.items() if _is_number(v)}


def _scenario_of(label: str) -> str:
    head = label.replace("/", " ").split()[0] if label.strip() else ""
    return {"AV": "Audio-Visual"}.get(head, head)


def _bar_plot(path: Path, values: dict[str, float], summary: dict[str, Any]) -> bool:
    if not values:
        return False
    labels = list(values)
    height = [values[k] for k in labels]
    fig, ax = _new_axes("AVQA accuracy per question type", "accuracy", size=(7.2, 3.8))
    colours = [_SCENARIO_COLOURS.get(_scenario_of(k), "#8C8C8C") for k in labels]
    is_avg = ["avg" in k.lower() or k.lower() == "overall" for k in labels]
    bars = ax.bar(
        range(len(labels)),
        height,
        color=colours,
        edgecolor="#333333",
        linewidth=[1.2 if a else 0 for a in is_avg],
        alpha=0.9,
        zorder=2,
    )
    for rect, v in zip(bars, height):
        ax.annotate(
            f"{v:.2f}",
            (rect.get_x() + rect.get_width() / 2, v),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(
        range(len(labels)), [k.replace("Audio-Visual/", "AV/") for k in labels], rotation=35, ha="right", fontsize=8
    )
    for key, label, style in (("avqa_chance_accuracy", "chance", ":"), ("avqa_accuracy", "overall", "--")):
        if _is_number(summary.get(key)):
            ax.axhline(
                summary[key], color="#333333", linestyle=style, linewidth=1.0, label=f"{label} {summary[key]:.2f}"
            )
    if max(height) <= 1.0:
        ax.set_ylim(0, 1.05)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False, loc="upper right")
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
    _LinePlot("audio_ratio.png", "Audio ratio", "fraction", "Fraction of audio-bearing samples in the batch mix.",
              lambda r: _keys(r, "audio_ratio"), log_ok=False),
    _LinePlot("retention.png", "Retention and accuracy (eval)", "value", "Evaluation records over training.",
              _sorted_first("eval/", "eval/vl_retention"), "eval/", from_evals=True, log_ok=False, markers=True),
    _LinePlot("grad_norm.png", "Gradient norm", "norm", "Global gradient norm.", lambda r: _keys(r, "grad_norm")),
    _LinePlot("learning_rates.png", "Learning rates", "lr", "Learning rate per parameter group.", _lr_keys, "lr/"),
    _LinePlot("param_drift.png", "Parameter drift", "drift", "Distance of the trainable weights from their start.",
              lambda r: _keys(r, "param_drift"), log_ok=False),
    _LinePlot("throughput.png", "Throughput", "samples / s", "Training samples per second.",
              lambda r: _keys(r, "samples_per_s"), log_ok=False),
    _LinePlot("memory.png", "Peak memory", "MB", "Peak accelerator memory.",
              lambda r: _keys(r, "peak_memory_mb"), log_ok=False),
)  # fmt: skip
_BAR_CAPTION = "Colour by scenario (blue audio, green visual, red audio-visual); outlined bars are pooled averages."


def _make_plots(run_dir: Path, log: RunLog, summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Draw every plot that has data. Returns (file name, title, caption) per plot drawn."""
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    for stale in plots_dir.glob("*.png"):  # a rerun must not show plots whose data vanished
        stale.unlink()
    drawn = []
    for spec in _LINE_PLOTS:
        records = log.evals if spec.from_evals else log.steps
        curves = {k.removeprefix(spec.strip): _series(records, k) for k in spec.keys(records)}
        kwargs = dict(markers=spec.markers, log_ok=spec.log_ok, weights=spec.weights)
        if _line_plot(plots_dir / spec.name, spec.title, spec.ylabel, curves, log.events, **kwargs):
            drawn.append((spec.name, spec.title, spec.caption))
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
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:,.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


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


def _cards_html(summary: dict[str, Any]) -> str:
    labels = dict(_KEY_METRICS)
    cards = []
    for key in _CARDS:
        v = summary.get(key)
        if not _is_number(v):
            continue
        note = ""
        if key == "vl_retention" and 0 <= v <= 1.5:
            ok = v >= _RETENTION_TARGET
            verdict = "met" if ok else "missed"
            note = f'<div class="note {"ok" if ok else "bad"}">target ≥ {_RETENTION_TARGET:.2f}: {verdict}</div>'
        cards.append(
            f'<div class="card"><div class="label">{_esc(labels[key])}</div>'
            f'<div class="value">{_esc(_fmt(float(v)))}</div>{note}</div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _summary_html(summary: dict[str, Any], problem: str | None) -> str:
    if problem:
        return f'<p class="bad">{_esc(problem)}</p>'
    if not summary:
        return '<p class="muted">No <code>metrics.json</code> in this run (training not finished?).</p>'
    rows = []
    labels = dict(_KEY_METRICS)
    ordered = [k for k, _ in _KEY_METRICS if k in summary] + sorted(k for k in summary if k not in labels)
    for key in ordered:
        label = labels.get(key, key)
        rows.append(
            f"<tr><td>{_esc(label)}<br><code class='muted'>{_esc(key)}</code></td>{_value_cell(summary[key])}</tr>"
        )
    return f"<table class='kv'><tr><th>Metric</th><th>Value</th></tr>{''.join(rows)}</table>"


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


def _by_type_table(values: dict[str, float]) -> str:
    if not values:
        return ""
    rows = "".join(f"<tr><td>{_esc(k)}</td><td class='num'>{_esc(_fmt(v))}</td></tr>" for k, v in values.items())
    head = "<tr><th>Type</th><th>Accuracy</th></tr>"
    return f"<details><summary>AVQA accuracy per type as a table</summary><table>{head}{rows}</table></details>"


def _render(run_dir: Path, log: RunLog, summary: dict[str, Any], problem: str | None, plots) -> str:
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
{_cards_html(summary)}
<h2>Summary (metrics.json)</h2>
{_summary_html(summary, problem)}
<h2>Training log</h2>
{_training_html(log)}
<h2>Phase, stage and weight changes</h2>
{_events_html(log.events)}
<h2>Plots</h2>
{plots_html}
{_by_type_table(_by_type_values(summary))}
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
    plots = _make_plots(run_dir, log, summary)
    out = run_dir / "report.html"
    out.write_text(_render(run_dir, log, summary, problem, plots), encoding="utf-8")
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
