"""safe_av.eval.report: a synthetic run folder -> report.html + every plot; partial logs don't crash."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from safe_av.eval.report import main, read_run_log, write_report

ALL_PLOTS = {
    "losses.png",
    "loss_weights.png",
    "audio_ratio.png",
    "retention.png",
    "avqa_by_type.png",
    "grad_norm.png",
    "learning_rates.png",
    "param_drift.png",
    "throughput.png",
    "memory.png",
}
CHROMIUM = Path("/usr/bin/chromium")

BY_TYPE = {
    "Audio/Counting": 0.71,
    "Audio/Comparative": 0.58,
    "Visual/Counting": 0.66,
    "Visual/Location": 0.62,
    "Audio-Visual/Existential": 0.81,
    "Audio-Visual/Location": 0.55,
    "Audio-Visual/Counting": 0.57,
    "Audio-Visual/Comparative": 0.52,
    "Audio-Visual/Temporal": 0.49,
}


def _write_synthetic_run(run_dir: Path, n_steps: int = 120) -> Path:
    """A run folder shaped like docs/interfaces.md: two phases, three curriculum stages."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        {"event": "phase_start", "step": 0, "phase": "A", "reason": "start of training"},
        {"event": "stage_change", "step": 0, "stage": "easy", "reason": "curriculum start"},
    ]
    for step in range(n_steps):
        if step == 40:
            lines.append(
                {"event": "stage_change", "step": 40, "stage": "medium", "reason": "retention 0.97 >= 0.95 for 2 evals"}
            )
            lines.append({"event": "weight_change", "step": 40, "alpha": 1.0, "beta": 0.5, "reason": "retention drop"})
        if step == 80:
            lines.append({"event": "phase_start", "step": 80, "phase": "B", "reason": "phase A budget spent"})
            lines.append({"event": "stage_change", "step": 80, "stage": "hard", "reason": "audio accuracy plateau"})
        if step == 55:
            lines.append({"event": "skipped_step", "step": 55, "reason": "non-finite loss"})
        task = 2.5 * math.exp(-step / 50) + 0.3
        lines.append(
            {
                "step": step,
                "epoch": step // 60,
                "phase": "A" if step < 80 else "B",
                "stage": "easy" if step < 40 else "medium" if step < 80 else "hard",
                "loss/total": task + 0.2,
                "loss/task": task,
                "loss/retention": 0.1 + 0.01 * (step % 7),
                "loss/distill": 0.08,
                "loss/fisher": 1e-3 * (1 + step / 100),
                "weights/alpha": 1.0,
                "weights/beta": 0.5 if step >= 40 else 1.0,
                "weights/gamma": 0.1,
                "weights/delta": 0.01,
                "audio_ratio": min(0.8, 0.2 + step / 200),
                "lr/projector": 1e-4 * min(1, (step + 1) / 20),
                "lr/fusion": 5e-5 * min(1, (step + 1) / 20),
                "grad_norm": 1.0 + 0.5 * math.sin(step / 5),
                "param_drift": step * 0.01,
                "samples_per_s": 40.0 + step % 3,
                "peak_memory_mb": 5120.0,
            }
        )
        if step % 20 == 19:
            lines.append(
                {
                    "step": step,
                    "eval/vl_retention": 0.99 - step / 4000,
                    "eval/stage_audio_accuracy": 0.4 + step / 600,
                    "stage": "foundation",
                }
            )
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {
        "original_vqa_accuracy": 0.6231,
        "safe_vqa_accuracy": 0.6087,
        "vl_retention": 0.9769,
        "avqa_accuracy": 0.6123,
        "avqa_accuracy_by_type": BY_TYPE,
        "avqa_chance_accuracy": 0.24,
        "audio_masked_avqa_accuracy": 0.4402,
        "curriculum_stages": ["easy", "medium", "hard"],
        "skipped_samples": 3,
        "notes": "<script>alert('x')</script>",  # must come out escaped
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return run_dir


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    return _write_synthetic_run(tmp_path / "run")


def test_full_run_writes_html_and_every_plot(synthetic_run: Path):
    out = write_report(synthetic_run)
    assert out == synthetic_run / "report.html"
    pngs = {p.name for p in (synthetic_run / "plots").glob("*.png")}
    assert pngs == ALL_PLOTS
    for name in pngs:
        data = (synthetic_run / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    page = out.read_text()
    for name in ALL_PLOTS:
        assert f'src="plots/{name}"' in page
    # summary numbers, event reasons and the escaping of untrusted text
    for text in (
        "0.9769",
        "0.6087",
        "retention 0.97 &gt;= 0.95 for 2 evals",
        "phase A budget spent",
        "weight_change",
        "1 skipped steps",
        "target ≥ 0.95: met",
    ):
        assert text in page, text
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_log_parsing_splits_records(synthetic_run: Path):
    log = read_run_log(synthetic_run / "metrics.jsonl")
    assert len(log.steps) == 120 and len(log.evals) == 6 and log.bad_lines == 0
    assert [e["event"] for e in log.events].count("stage_change") == 3


@pytest.mark.parametrize(
    "jsonl",
    [
        None,  # no log at all
        "",  # empty log
        '{"step": 0, "loss/total": 1.0}\n{"step": 1, "loss/tot',  # truncated last line
        '{"event": "phase_start", "step": 0}\n[1, 2]\n{"step": "x", "loss/task": "nan"}\n'
        '{"step": 3, "loss/task": NaN}\n',  # non-numbers, a JSON list, NaN
        '{"step": 2, "eval/avqa_accuracy_by_type": {"table": {"Audio (avg)": 0.5, "Overall": null}}}\n',
    ],
)
def test_partial_or_empty_logs_never_crash(tmp_path: Path, jsonl):
    if jsonl is not None:
        (tmp_path / "metrics.jsonl").write_text(jsonl)
    out = write_report(tmp_path)
    assert out.is_file() and "</html>" in out.read_text()


def test_only_existing_data_is_plotted(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss/total": 2.0}\n{"step": 1, "loss/total": 1.5}\n')
    (tmp_path / "metrics.json").write_text("{not json")
    page = write_report(tmp_path).read_text()
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"losses.png"}
    assert "could not be parsed" in page


def test_rerun_removes_stale_plots(synthetic_run: Path):
    write_report(synthetic_run)
    (synthetic_run / "metrics.json").unlink()
    (synthetic_run / "metrics.jsonl").write_text('{"step": 0, "grad_norm": 1.0}\n')
    write_report(synthetic_run)
    assert {p.name for p in (synthetic_run / "plots").glob("*.png")} == {"grad_norm.png"}


def test_main_exit_codes(synthetic_run: Path, tmp_path: Path, capsys):
    assert main(synthetic_run) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert main(tmp_path / "missing") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(empty) == 2 and not (empty / "report.html").exists()  # no metric file: not a run folder
    assert "not a training run folder" in capsys.readouterr().err


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium_without_errors(synthetic_run: Path, tmp_path: Path):
    """Load the page headless; no console errors, every <img> decoded (naturalWidth > 0).

    A probe copy of report.html gets a script that records broken images in the DOM and logs
    them with console.error; ``--dump-dom`` returns the DOM after load, ``--enable-logging``
    puts console messages on stderr.
    """
    report = write_report(synthetic_run)
    probe = synthetic_run / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => {"
        " const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);"
        " if (bad.length) console.error('broken images: ' + bad.join(' '));"
        " document.body.setAttribute('data-images', document.images.length + ':' + bad.length); });</script>"
    )
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    profile = tmp_path / "chromium-profile"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=3000",
        "--dump-dom",
        probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    shutil.rmtree(profile, ignore_errors=True)
    match = re.search(r'data-images="(\d+):(\d+)"', proc.stdout)
    assert match, f"page did not load: {proc.stderr[-2000:]}"
    assert int(match.group(1)) == len(ALL_PLOTS) and int(match.group(2)) == 0
    # Chromium logs every console message (any level) and uncaught exception as "...:CONSOLE...";
    # the report has no script of its own, so any such line is an error (the probe logs only on failure).
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
