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
        "0.977",
        "0.609",
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


# ---------------------------------------------------------------------------------------------
# Evidence: n, CIs, baselines, setup, per-type chance (a run written by the current evaluate_run)
# ---------------------------------------------------------------------------------------------

TABLE_N = {"Audio Counting": 33, "Audio Comparative": 26, "Audio (avg)": 59, "Visual Counting": 31,
           "Visual Location": 33, "Visual (avg)": 64, "AV Existential": 24, "AV Location": 28, "AV Counting": 30,
           "AV Comparative": 24, "AV Temporal": 33, "AV (avg)": 139, "Overall": 262}
CONFIG = """
model: {base: tiny-blip2-opt, audio_encoder: tiny-clap}
data: {root: runs/data/synthetic-demo, synthetic: true, eval_split: val}
train:
  optim: {grad_clip: 1.0}
  phases:
  - {name: projector_warmup, train: [projector], unfreeze: [], datasets: {audiocaps: 1.0}, max_steps: 400}
  - {name: fusion, train: [projector, fusion], unfreeze: [], datasets: {musicavqa: 1.0, vqav2: 0.5}, max_steps: 900,
     curriculum: true}
  - {name: end_to_end, train: [projector, fusion, base, lora], unfreeze: [language_projection],
     datasets: {musicavqa: 0.6}, max_steps: 600}
curriculum: {retention_threshold: 0.9, eval_samples: 48}
"""


def _write_evidence_run(run_dir: Path) -> Path:
    _write_synthetic_run(run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    table = {k: 0.5 for k in TABLE_N} | {"AV Comparative": 0.4167, "Overall": 0.6756}
    summary.update(
        avqa_accuracy=0.6756, avqa_accuracy_by_type=table,
        audio_masked_avqa_accuracy=0.3053, audio_shuffled_avqa_accuracy=0.4962,
        avqa_chance_accuracy=0.2962, avqa_majority_accuracy=0.3550,
        audio_dependent_accuracy=0.6616, audio_masked_audio_dependent_accuracy=0.1818,
        audio_shuffled_audio_dependent_accuracy=0.4394, audio_dependent_chance_accuracy=0.3290,
        audio_dependent_majority_accuracy=0.3889,
        avqa_n_by_type=TABLE_N, avqa_chance_by_type={k: 0.25 for k in TABLE_N} | {"AV Comparative": 0.5},
        avqa_majority_by_type={k: 0.3 for k in TABLE_N} | {"AV Comparative": 0.25, "Audio Comparative": None},
        audio_masked_avqa_accuracy_by_type={k: 0.2 for k in TABLE_N} | {"AV Comparative": 0.125},
        audio_shuffled_avqa_accuracy_by_type={k: 0.35 for k in TABLE_N},
        eval_samples={"vqa": {"evaluated": 180, "skipped": 0}, "avqa": {"evaluated": 262, "skipped": 0}},
        phase_starts={"0": 0, "1": 400, "2": 1300},
    )
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text(CONFIG)
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    (run_dir / "adapter").mkdir()
    save_file({"projector.w": np.zeros((10, 5), np.float32), "fusion.b": np.zeros(7, np.float32),
               "base.lm.q_proj.lora_A.default.weight": np.zeros((2, 3), np.float32),
               "base.model.language_projection.weight": np.zeros((4, 4), np.float32)},
              str(run_dir / "adapter" / "adapter.safetensors"))
    return run_dir


def _row(page: str, first_cell: str) -> list[str]:
    """The text of the cells of the table row whose first cell is ``first_cell``."""
    m = re.search(r"<tr><td[^>]*>" + re.escape(first_cell) + r"</td>(.*?)</tr>", page)
    assert m, first_cell
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", m.group(1))]


def test_wilson_interval_known_values():
    from safe_av.eval.report import _wilson

    lo, hi = _wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = _wilson(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert _wilson(0.5, None) is None and _wilson(0.5, 0) is None and _wilson(None, 10) is None


def test_report_shows_n_ci_baselines_setup_and_per_type_chance(tmp_path: Path):
    run = _write_evidence_run(tmp_path / "run")
    page = write_report(run).read_text()
    # baseline table: SAFE [CI] / removed / shuffled / chance / majority / n, overall and audio-dependent
    assert _row(page, "All AVQA questions") == ["0.676 [0.617, 0.729]", "0.305", "0.496", "0.296", "0.355", "262"]
    assert _row(page, "Audio-dependent (Audio, Audio-Visual)") == [
        "0.662 [0.593, 0.724]", "0.182", "0.439", "0.329", "0.389", "198"]  # n = Audio (avg) + AV (avg)
    # per-type table: n / SAFE / audio removed / audio shuffled / chance / majority, the dash for a missing value
    assert _row(page, "AV Comparative") == ["24", "0.417 [0.245, 0.612]", "0.125", "0.350", "0.500", "0.250"]
    assert _row(page, "Audio Comparative")[-1] == "—"
    # cards: n and Wilson CI; the verdict is a point estimate against the configured target
    assert "n = 262 · Wilson 95% CI [0.617, 0.729]" in page and "n = 180 VQA questions" in page
    assert "target ≥ 0.90: met (point estimate)" in page
    # setup: models, data, split, phases with what they train, adapter size from the safetensors header
    for text in ("tiny-blip2-opt", "tiny-clap", "runs/data/synthetic-demo (synthetic data)",
                 "the same split the curriculum",
                 "79 parameters (projector 50, unfrozen base modules 16, fusion 7, LoRA 6)"):
        assert text in page, text
    assert _row(page, "1")[:2] == ["projector_warmup", "projector"]
    assert _row(page, "3")[:5] == ["end_to_end", "projector, fusion, base, lora", "language_projection",
                                   "musicavqa 0.600", "600"]
    # phase starts 1-based with names; captions from the config
    starts = "phase 1 (projector_warmup): step 0<br>phase 2 (fusion): step 400<br>phase 3 (end_to_end): step 1,300"
    assert starts in page
    assert "on the first 48 VQA evaluation questions" in page
    assert "phase 1 (projector_warmup), phase 2 (fusion)), retention is 1 by construction" in page
    assert "train.optim.grad_clip = 1" in page and "anchored base parameters" in page
    assert "min(#matching references / 3, 1)" in page and "first 64 loaded VQA evaluation questions" in page
    # per-type dicts are not repeated as raw sub-tables in the summary
    assert "avqa_chance_by_type</code>" not in page


def test_older_run_without_new_keys_shows_dashes(synthetic_run: Path):
    page = write_report(synthetic_run).read_text()
    assert _row(page, "Audio/Counting") == ["—", "0.710", "—", "—", "—", "—"]
    assert "All AVQA questions" in page and "n unknown" in page  # no eval_samples: no n, no CI
    assert "No readable <code>config.yaml</code>" in page


def test_malformed_config_and_new_keys_never_crash(synthetic_run: Path):
    (synthetic_run / "config.yaml").write_text("train: {phases: [3, {name: x, train: 5}], optim: {grad_clip: big}}\n"
                                               "curriculum: {retention_threshold: high}\ndata: [1]\n")
    summary = json.loads((synthetic_run / "metrics.json").read_text())
    summary.update(avqa_n_by_type={"Audio/Counting": None, "x": "y"}, avqa_chance_by_type=[1, 2],
                   eval_samples={"avqa": {"evaluated": "many"}}, phase_starts={"a": 1},
                   audio_dependent_accuracy="n/a")
    (synthetic_run / "metrics.json").write_text(json.dumps(summary))
    (synthetic_run / "adapter").mkdir()
    (synthetic_run / "adapter" / "adapter.safetensors").write_bytes(b"\xff" * 20)
    page = write_report(synthetic_run).read_text()
    assert "</html>" in page and "target ≥ 0.95: met (point estimate)" in page
    assert "adapter.safetensors missing or unreadable" in page
    (synthetic_run / "config.yaml").write_text("{not: yaml: [")
    assert "</html>" in write_report(synthetic_run).read_text()


def test_stage_timeline_ends_each_stage_and_says_why(tmp_path: Path):
    """Stages from curriculum_stages, ends from the next stage (or the start of the first phase after the
    curriculum's), audio ratios from the config, reasons from the stage events; a count of forced changes."""
    import re

    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "train": {"phases": [{"name": "a"}, {"name": "b", "curriculum": True}, {"name": "c"}]},
        "curriculum": {"stages": [{"name": "s1", "audio_ratio": 0.25}, {"name": "s2", "audio_ratio": 0.5},
                                  {"name": "s3", "audio_ratio": 1.0}]}}))
    (tmp_path / "metrics.json").write_text(json.dumps({
        "curriculum_stages": {"s1": 10, "s2": 30, "s3": 40}, "phase_starts": {"0": 0, "1": 10, "2": 50},
        "steps": 80}))
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"event": "stage_change", "step": 30, "from": "s1", "to": "s2", "audio_ratio": 0.5,
                    "reason": "audio accuracy 0.72 >= 0.70 and retention 0.99 >= 0.95", "forced": False}) + "\n"
        + json.dumps({"event": "stage_change", "step": 40, "from": "s2", "to": "s3", "audio_ratio": 1.0,
                      "reason": "max_steps reached (10 >= 10)", "forced": True}) + "\n")
    page = write_report(tmp_path).read_text()
    section = page[page.index("<h2>Curriculum stages"):page.index("<h2>Phase, stage and weight changes")]
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", section)][1:]
    assert rows == [["s1", "10", "30", "20", "0.250", "audio accuracy 0.72 &gt;= 0.70 and retention 0.99 &gt;= 0.95"],
                    ["s2", "30", "40", "10", "0.500", "max_steps reached (10 &gt;= 10)"],
                    ["s3", "40", "50", "10", "1.000", "still in this stage when the curriculum&#x27;s phases ended"]]
    assert "1 of 2 stage changes came from reaching the stage" in section


def test_log_scale_choice_keeps_small_terms_visible_when_some_are_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safe_av.eval.report import _maybe_log_scale

    scales = []
    for values in ([0.0, 1e-3, 5.0], [1e-3, 5.0], [0.1, 0.5], [0.0, 0.1, 0.5], [-1.0, 1e-3, 5.0]):
        fig, ax = plt.subplots()
        _maybe_log_scale(ax, values)
        scales.append(ax.get_yscale())
        plt.close(fig)
    assert scales == ["symlog", "log", "linear", "linear", "linear"]


def test_report_setup_names_the_selection_split_and_what_was_left_out(tmp_path: Path):
    """A run with data.select_split: the setup names the three splits and says the final VQA set leaves out what
    the training evaluated on (its own split), instead of the old warning that one split served both."""
    run = _write_evidence_run(tmp_path / "run")
    config = (run / "config.yaml").read_text()
    assert "eval_split: val}" in config
    (run / "config.yaml").write_text(config.replace("eval_split: val}",
                                                    "eval_split: test, vqa_eval_split: val, select_split: val}"))
    page = write_report(run).read_text()
    assert _row(page, "Final AVQA split (data.eval_split)") == ["test"]
    assert _row(page, "Final VQA split (data.vqa_eval_split)") == ["val"]
    assert _row(page, "Split of the evaluations during training (data.select_split)") == ["val"]
    assert "The final metrics of VQA (val) come from that split too, without every image and video" in page
    assert "not an untouched test set" not in page
    assert "Evaluations during training, on the val split" in page


def test_retention_caption_counts_a_changed_base_in_every_later_phase():
    """'Retention is 1 by construction' only while nothing in the base has changed: not in a phase after the one
    that trained LoRA or an unfrozen module, and `unfreeze` without `base` in `train` trains nothing (as in the
    trainer)."""
    from safe_av.eval.report import _retention_caption

    phases = [{"name": "warm", "train": ["projector"], "unfreeze": ["qformer"]},  # unfreeze alone: nothing
              {"name": "e2e", "train": ["projector", "base"], "unfreeze": ["language_projection"]},
              {"name": "after", "train": ["projector"]},  # language_projection stays trained
              ]
    text = _retention_caption({"train": {"phases": phases}, "curriculum": {"eval_samples": 8}})
    assert "(phase 1 (warm)), retention is 1 by construction" in text
    phases[1] = {"name": "lora", "train": ["lora"]}
    assert "(phase 1 (warm)), retention" in _retention_caption({"train": {"phases": phases}})
