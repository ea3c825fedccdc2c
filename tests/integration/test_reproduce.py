"""``safe reproduce``: the variants are the promised config transformations, and ``--quick`` writes real results.

The end-to-end test runs ``--quick`` once (1 seed, a few steps per phase on the tiny corpus: about 1.5 min
on 2 idle CPU cores) and checks the files, the table's shape and that every number is a real one.
"""

import argparse
import json
import math

import pytest

from safe_av.config import load_config
from safe_av.reproduce import (
    ALIASES,
    QUICK_PHASE_STEPS,
    REPORTED,
    SCALARS,
    TRAINED_VARIANTS,
    VARIANTS,
    convergence_steps,
    fixed_audio_ratio,
    main,
    nominal_phase_steps,
    scale_budget,
    variant_configs,
)

DEMO = "configs/demo.yaml"


# ----------------------------------------------------------------------------- config transformations (fast)


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config(DEMO)


def _phase3(cfg):
    return next(p for p in cfg.train.phases if "base" in p.train and p.unfreeze)


def test_variants_are_transformations_of_one_config(demo_cfg):
    v = variant_configs(demo_cfg)
    assert set(v) == set(VARIANTS)
    base = demo_cfg
    # the same data and budget for all: datasets, batch sizes, epochs / max_steps, seeds
    for name, cfg in v.items():
        assert cfg.data == base.data, name
        assert [(p.datasets, p.batch_size, p.epochs, p.max_steps) for p in cfg.train.phases] == \
               [(p.datasets, p.batch_size, p.epochs, p.max_steps) for p in base.train.phases], name
        assert cfg.train.seed == base.train.seed and cfg.train.pretrain == base.train.pretrain, name
    assert v["safe"] == base and v["original"] == base


def test_naive_finetune_unfreezes_phase3_modules_everywhere(demo_cfg):
    naive = variant_configs(demo_cfg)["naive_finetune"]
    p3 = _phase3(demo_cfg)
    for p in naive.train.phases:
        assert "base" in p.train and p.unfreeze == p3.unfreeze
        assert p.lr["base"] > 0
    assert naive.loss.task_only and not naive.curriculum.enabled
    ratio = fixed_audio_ratio(demo_cfg)
    assert all(p.audio_ratio == ratio for p in naive.train.phases if p.curriculum)


def test_ablations_change_one_thing(demo_cfg):
    v = variant_configs(demo_cfg)
    concat = v["simple_concat"]
    assert not concat.model.fusion.enabled
    assert all("fusion" not in p.train and "fusion" not in p.lr for p in concat.train.phases)
    assert v["no_fisher"].loss.fisher is False and v["no_fisher"].model == demo_cfg.model
    assert v["no_distillation"].loss.distillation is False and v["no_distillation"].loss.fisher
    assert not v["no_curriculum"].curriculum.enabled and not v["no_curriculum"].loss.task_only
    assert ALIASES == {"no_attention_fusion": "simple_concat"}


def test_scale_budget_pins_the_same_steps_for_every_variant(demo_cfg):
    nominal = [16, 204, 102]
    half = scale_budget(demo_cfg, 0.5, steps=nominal)
    assert [p.max_steps for p in half.train.phases] == [8, 102, 51]
    assert half.curriculum.max_stage_steps <= demo_cfg.curriculum.max_stage_steps
    assert half.train.optim.warmup_steps == round(demo_cfg.train.optim.warmup_steps * 0.5)
    for name, cfg in variant_configs(half).items():
        assert [p.max_steps for p in cfg.train.phases] == [8, 102, 51], name
    same = scale_budget(demo_cfg, 1.0, steps=nominal)
    assert [p.max_steps for p in same.train.phases] == nominal and same.curriculum == demo_cfg.curriculum


def test_nominal_steps_count_a_curriculum_phase_at_its_first_stage(small_corpus, tmp_path):
    from tests.integration.conftest import tiny_train_config

    cfg = tiny_train_config(small_corpus, tmp_path)
    assert nominal_phase_steps(cfg) == [p.max_steps for p in cfg.train.phases]
    for p in cfg.train.phases:
        p.max_steps, p.epochs = None, 1.0
    steps = nominal_phase_steps(cfg)
    assert all(isinstance(n, int) and n >= 1 for n in steps)
    # without the curriculum the epoch holds every difficulty: at least as many steps
    off = variant_configs(cfg)["no_curriculum"]
    assert all(a <= b for a, b in zip(steps, nominal_phase_steps(off)))


def test_convergence_steps_per_phase():
    recs = [{"step": i + 1, "phase": 1, "loss/task": v} for i, v in enumerate([10, 5, 2.05, 2.0, 2.0])]
    recs += [{"step": 6 + i, "phase": 2, "loss/task": v} for i, v in enumerate([3.0, 1.0, 1.0])]
    recs.append({"event": "phase_start", "step": 5, "phase": 2})
    # phase 1: first within 10% of 2.0 is its 3rd step; phase 2: its 2nd step
    assert convergence_steps(recs) == 3 + 2
    assert convergence_steps([]) is None


def test_result_reuse_key_covers_config_and_code(monkeypatch):
    """A finished run's result.json is reused only for the same resolved config *and* the same package source:
    a rerun after a code change trains again (it once reused results the previous code had made)."""
    import copy

    import safe_av.reproduce as R

    cfg = load_config(DEMO)
    key = R._config_hash(cfg)
    assert key == R._config_hash(copy.deepcopy(cfg))
    other = copy.deepcopy(cfg)
    other.train.seed += 1
    assert R._config_hash(other) != key
    monkeypatch.setattr(R, "_code_digest", lambda: "a changed source file")
    assert R._config_hash(cfg) != key


# ----------------------------------------------------------------------------- --quick end to end


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    rc = main(argparse.Namespace(config=DEMO, set=[], output_dir=str(out), seeds=3, quick=True))
    return rc, out


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_writes_results(quick):
    rc, out = quick
    assert rc == 0
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["info"]["quick"] and data["info"]["seeds"] == [0]  # --quick: one seed whatever --seeds says
    assert all(s["status"] == "ok" for runs in data["status"].values() for s in runs), data["status"]


def test_quick_values_are_real_numbers(quick):
    _, out = quick
    data = json.loads((out / "results.json").read_text())
    variants = data["variants"]
    assert list(variants) == list(REPORTED)
    for name, entry in variants.items():
        assert entry["runs"] == 1, name
        for key in SCALARS:
            stat = entry[key]
            assert set(stat) == {"mean", "std", "n"}, (name, key)
            if stat["mean"] is not None:  # one seed: no spread (it was shown as "± 0.0")
                assert _real(stat["mean"]) and stat["std"] is None and stat["n"] == 1, (name, key, stat)
    orig = variants["original"]
    assert orig["vl_retention"]["mean"] == 1.0  # the reference itself
    assert orig["feature_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert orig["attention_correlation"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert orig["steps_to_converge"]["mean"] is None and orig["retrieval_r5"]["mean"] is None
    steps = sum(QUICK_PHASE_STEPS[min(i, len(QUICK_PHASE_STEPS) - 1)]
                for i in range(len(load_config(DEMO).train.phases)))
    always = ("vqa_accuracy", "avqa_accuracy", "audio_dependent_accuracy", "temporal_accuracy", "feature_similarity",
              "attention_correlation", "retrieval_r5", "retrieval_r5_text_to_audio", "steps_to_converge",
              "peak_memory_mb", "divergent")
    for name in TRAINED_VARIANTS:
        entry = variants[name]
        for key in always:
            assert _real(entry[key]["mean"]), (name, key)
        assert entry["total_steps"]["mean"] == steps, name
        assert 1 <= entry["steps_to_converge"]["mean"] <= steps
        assert -1.0 <= entry["attention_correlation"]["mean"] <= 1.0 + 1e-9
        assert entry["peak_memory_mb"]["mean"] > 0
        assert 0.0 <= entry["retrieval_r5"]["mean"] <= 1.0
    # the same pretrained base under every variant: each run's own reference VQA is the original's
    ref = data["runs"]["original"][0]["vqa_accuracy"]
    assert all(r["original_vqa_accuracy"] == ref for n in TRAINED_VARIANTS for r in data["runs"][n])
    # no_attention_fusion is reported from simple_concat's runs
    assert variants["no_attention_fusion"]["same_runs_as"] == "simple_concat"
    assert variants["no_attention_fusion"]["avqa_accuracy"] == variants["simple_concat"]["avqa_accuracy"]
    comp = data["comparisons"]
    for key in ("convergence_speedup_vs_naive", "no_fisher_retention_delta", "no_curriculum_audio_delta",
                "no_attention_fusion_multimodal_delta"):
        assert key in comp


def test_quick_markdown_has_the_spec_shape(quick):
    _, out = quick
    md = (out / "results.md").read_text()
    claims = ("99.2%", "0.95", "0.89", "73.5%", "0.68", "67.8%", "2.3x", "−12.3%", "−8.7%", "−15.2%", "−21.5%")
    for claim in claims:
        assert claim in md, claim
    lines = md.splitlines()
    header = "| Metric | " + " | ".join(REPORTED) + " |"
    assert header in lines
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) == len(SCALARS) + 1  # every metric, then the divergent-run counts
    for row in rows:
        assert row.count("|") == len(REPORTED) + 2, row
    for ablation in ("no_fisher", "no_distillation", "no_curriculum", "no_attention_fusion"):
        assert any(line.startswith(f"| {ablation} |") for line in lines), ablation


@pytest.mark.parametrize("base", ["tiny-blip2-opt", "tiny-llava"])
def test_eager_attention_is_restored_for_every_sub_model(tiny_models, base):
    from safe_av.reproduce import eager_attention

    hf = tiny_models(base)[1].model
    subs = [k for k in hf.config.sub_configs if getattr(hf.config, k, None) is not None]
    before = {k: getattr(hf.config, k)._attn_implementation for k in subs}
    assert set(before.values()) == {"sdpa"}, before
    with eager_attention(hf):
        assert {getattr(hf.config, k)._attn_implementation for k in subs} == {"eager"}
    assert {k: getattr(hf.config, k)._attn_implementation for k in subs} == before
    with pytest.raises(RuntimeError), eager_attention(hf):
        raise RuntimeError("boom")
    assert {k: getattr(hf.config, k)._attn_implementation for k in subs} == before
    assert hf.config._attn_implementation == "sdpa"


def test_default_config_outside_the_repository_root_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from safe_av.cli import main as cli

    monkeypatch.chdir(tmp_path)
    assert cli(["reproduce", "--output-dir", str(tmp_path / "r"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no --config given" in err and "configs/demo.yaml" in err and "--config FILE" in err
    assert not (tmp_path / "r").exists()


def test_ablation_deltas_are_paired_and_failed_runs_are_not_counted_as_stable():
    """A delta is the mean of per-seed differences over the seeds both variants ran (a seed missing on one side no
    longer shifts it), with their spread; a run that failed with an error is left out of the divergence count."""
    from safe_av.reproduce import aggregate, comparisons

    def run(variant, seed, retention, status="ok", divergent=0.0):
        metrics = {"variant": variant, "seed": seed, "vl_retention": retention,
                   "divergent": None if status == "error" else divergent}
        return {"status": status, "metrics": metrics, **({"error": "boom"} if status == "error" else {})}

    results = {"safe": [run("safe", 0, 0.90), run("safe", 1, 0.92), run("safe", 2, 0.99)],
               "no_fisher": [run("no_fisher", 0, 0.90), run("no_fisher", 1, 0.92)],
               "naive_finetune": [run("naive_finetune", 0, 0.5, divergent=1.0),
                                  run("naive_finetune", 1, None, status="error"),
                                  run("naive_finetune", 2, None, status="error")]}
    agg = aggregate(results)
    comp = comparisons(agg, results)
    assert comp["no_fisher_retention_delta"] == pytest.approx(0.0)  # unpaired means gave -0.023
    assert comp["paired"]["no_fisher_retention"] == {"mean": pytest.approx(0.0), "std": pytest.approx(0.0), "n": 2}
    assert agg["naive_finetune"]["runs"] == 1 and agg["naive_finetune"]["divergent_runs"] == 1
    assert agg["naive_finetune"]["divergent"]["mean"] == 1.0 and len(agg["naive_finetune"]["errors"]) == 2
