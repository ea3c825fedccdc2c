"""Stage A end to end on tiny models: phases, exact resume, metrics."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safe_av.training.loop import ResumeConfigError, RunFolderError, Stopped, Trainer, config_changes
from tests.integration.conftest import losses_by_step as _losses, tiny_train_config


@pytest.fixture(scope="module")
def full_run(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_train_config(small_corpus, tmp, **{"train.optim.grad_accum": 2, "train.checkpoint_every": 1,
                                                  "data.feature_cache": f"{tmp}/features"})
    metrics = Trainer(cfg, tmp / "run").train()
    return cfg, tmp, metrics


def test_run_writes_metrics_report_adapter(full_run):
    cfg, tmp, metrics = full_run
    run = tmp / "run"
    for key in ["original_vqa_accuracy", "safe_vqa_accuracy", "vl_retention", "avqa_accuracy", "avqa_accuracy_by_type",
                "avqa_chance_accuracy", "audio_masked_avqa_accuracy", "curriculum_stages", "skipped_samples"]:
        assert key in metrics, key
    assert json.loads((run / "metrics.json").read_text())["steps"] == 9
    assert (run / "report.html").is_file()
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    # the curriculum went through all four stages (max 2 steps each over the 7 curriculum steps)
    assert list(metrics["curriculum_stages"]) == ["foundation", "development", "advanced", "mastery"]
    assert metrics["curriculum_stages"]["foundation"] == 2  # phase 2's first step: phase 1 has no curriculum
    events = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in l]
    assert [e["phase"] for e in events if e["event"] == "phase_start"] == [1, 2, 3]
    # the stage evaluations read the selection split's clips through the (fresh) feature cache: they score
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "eval/" in l]
    audio = [e.get("eval/stage_audio_accuracy") for e in evals]
    assert audio and all(a is not None and 0.0 <= a <= 1.0 for a in audio), audio
    assert all(e["reason"] for e in events)
    # the final evaluation's records: one per question and condition, the metrics recomputable from them
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    by = {}
    for p in preds:
        by.setdefault((p["set"], p["condition"]), []).append(p)
    assert set(by) == {("vqa", "safe"), ("avqa", "safe"), ("avqa", "audio_removed"), ("avqa", "audio_shuffled")}
    assert len(by[("vqa", "safe")]) == metrics["eval_samples"]["vqa"]["evaluated"]
    assert all(len(by[("avqa", c)]) == metrics["eval_samples"]["avqa"]["evaluated"]
               for c in ("safe", "audio_removed", "audio_shuffled"))
    vqa = by[("vqa", "safe")]
    assert sum(p["score"] for p in vqa) / len(vqa) == pytest.approx(metrics["safe_vqa_accuracy"])
    for condition, key in (("safe", "avqa_accuracy"), ("audio_removed", "audio_masked_avqa_accuracy")):
        recs = by[("avqa", condition)]
        assert sum(p["correct"] for p in recs) / len(recs) == pytest.approx(metrics[key])


def test_exact_resume_after_kill_mid_epoch_with_accumulation(full_run):
    cfg, tmp, _ = full_run
    run = tmp / "killed"
    with pytest.raises(Stopped):
        Trainer(cfg, run, stop_after=4).train()  # phase 2, mid-epoch, grad_accum=2
    assert not (run / "metrics.json").exists()
    Trainer(cfg, run, resume="latest").train()
    ref, got = _losses(tmp / "run"), _losses(run)
    assert sorted(got) == sorted(ref) and len(ref) == 9
    for step in ref:
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    a = load_file(str(tmp / "run" / "adapter" / "adapter.safetensors"))
    b = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _LongerOnResume(Trainer):
    """The resumed phase's length comes out 5 steps longer when recomputed, as an epoch-based curriculum phase's does
    when the run resumes at a later stage (fewer or more batches per epoch)."""

    def _start_phase(self, index):
        optim, sched, stream, steps = super()._start_phase(index)
        resumed = self.resume and self.state.phase == index and self.state.phase_step > 0
        return optim, sched, stream, steps + (5 if resumed else 0)


def test_resume_keeps_the_length_an_epoch_based_phase_started_with(small_corpus, tmp_path):
    phases = ("[{name: p1, train: [projector], lr: {projector: 1.0e-3}, datasets: {audiocaps: 1.0}, max_steps: 2, "
              "batch_size: 4}, {name: p2, train: [projector, fusion], lr: {projector: 1.0e-3, fusion: 1.0e-3}, "
              "datasets: {musicavqa: 1.0, vqav2: 1.0}, epochs: 1, batch_size: 4, curriculum: true}]")
    cfg = tiny_train_config(small_corpus, tmp_path, **{"train.phases": phases, "train.checkpoint_every": 1,
                                                       "data.feature_cache": f"{tmp_path}/f"})
    Trainer(cfg, tmp_path / "ref").train()
    assert len(_losses(tmp_path / "ref")) > 4
    run = tmp_path / "run"
    with pytest.raises(Stopped):
        Trainer(cfg, run, stop_after=4).train()  # in phase 2
    _LongerOnResume(cfg, run, resume="latest").train()
    assert sorted(_losses(run)) == sorted(_losses(tmp_path / "ref"))  # not 5 steps more


def test_retention_is_tracked_in_a_base_training_phase_without_curriculum(small_corpus, tmp_path):
    """Phase 3 trains the base (language_projection) outside the curriculum, as the demo's does: the held-out
    VL retention is still evaluated every curriculum.eval_every steps there (the report's curve goes on)."""
    phases = ("train.phases=[{name: p1, train: [projector], lr: {projector: 1.0e-3}, datasets: {audiocaps: 1.0}, "
              "max_steps: 2, batch_size: 4}, {name: p3, train: [projector, fusion, base], "
              "unfreeze: [language_projection], lr: {projector: 1.0e-3, fusion: 1.0e-3, base: 1.0e-3}, "
              "datasets: {musicavqa: 1.0, vqav2: 1.0}, max_steps: 4, batch_size: 4}]")
    cfg = tiny_train_config(small_corpus, tmp_path, **dict([phases.split("=", 1)]))

    class Recorded(Trainer):  # the tiny test base answers no VQA question right (retention undefined): stand in
        def _retention(self):
            return 0.5 + self.state.global_step / 100

    Recorded(cfg, tmp_path / "run").train()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/vl_retention"]) for r in records if "eval/vl_retention" in r]
    assert evals == [(3, 0.53), (6, 0.56)]  # eval_every=3; phase 1 (steps 1-2) trains no base part
    # the audio accuracy goes on beside it, on the audio-dependent held-out questions of every difficulty
    audio = [r["eval/stage_audio_accuracy"] for r in records if "eval/vl_retention" in r]
    assert len(audio) == 2 and all(0.0 <= a <= 1.0 for a in audio)


def test_evaluation_during_training_leaves_the_random_stream_alone(full_run, tmp_path):
    """Curriculum and retention evaluations run between training steps; a DataLoader draws its seed from torch's
    global generator, so an evaluation must not move it (or evaluating at other steps would change training)."""
    cfg, _, _ = full_run
    tr = Trainer(cfg, tmp_path / "run")
    tr.setup()
    tr._eval_subsets()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    recs = tr._predict(tr.vqa_subset)
    assert len(recs) == len(tr.vqa_subset) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_fresh_run_into_an_earlier_runs_folder_is_refused_or_overwritten(full_run, tmp_path):
    """Without --resume, a folder holding a run is refused before any work (two runs' metrics.jsonl would
    mix, its Fisher would be reused, its checkpoints left for a later --resume); --overwrite removes exactly the
    run's own outputs."""
    cfg, _, _ = full_run
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "checkpoints" / "step-0000004" / "model.safetensors").write_bytes(b"x")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "fisher.safetensors").write_bytes(b"x")
    (run / "eval-val.json").write_text("{}")  # a `safe eval` output: not the run's, kept
    (run / "plots").mkdir()  # empty: does not count
    with pytest.raises(RunFolderError, match=r"already holds a training run \(metrics.jsonl, fisher.safetensors, "
                                             r"checkpoints\): pass --resume"):
        Trainer(cfg, run).train()
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n'  # refused before touching anything
    Trainer(cfg, run, overwrite=True)._clear_previous_run()
    assert sorted(p.name for p in run.iterdir()) == ["eval-val.json", "plots"]
    Trainer(cfg, run)._clear_previous_run()  # nothing left to refuse


def test_config_changes_lists_every_differing_leaf():
    old = {"model": {"fusion": {"num_heads": 4}}, "train": {"phases": [{"lr": {"a": 1.0}}, {"lr": {"a": 2.0}}]}}
    new = {"model": {"fusion": {"num_heads": 8}}, "train": {"phases": [{"lr": {"a": 1.0}}, {"lr": {"a": 3.0}}]},
           "eval": {"batch_size": 4}}
    assert config_changes(old, new) == [("model.fusion.num_heads", 4, 8), ("train.phases.1.lr.a", 2.0, 3.0),
                                        ("eval", None, {"batch_size": 4})]
    assert config_changes(old, old) == []


def test_resume_with_another_model_section_is_refused_before_writing(full_run, tmp_path, caplog):
    """--resume compares the config with the checkpoint's first: a changed model section is refused (exit 2 in
    the CLI) before config.yaml or anything else is rewritten; other changes are named in a warning."""
    import copy
    import logging
    import shutil

    cfg, tmp, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = copy.deepcopy(cfg)
    changed.model.projector.hidden_dim *= 2
    with pytest.raises(ResumeConfigError, match=r"model.projector.hidden_dim: 32 -> 64.*--config .*config.yaml"):
        Trainer(changed, run, resume="latest").train()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    lr = copy.deepcopy(cfg)
    lr.train.phases[1].lr["fusion"] = 0.5
    lr.train.log_every = 3  # reporting only: not named
    with caplog.at_level(logging.WARNING, logger="safe_av.training.loop"):
        Trainer(lr, run, resume="latest")._check_resume_config()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "train.phases.1.lr.fusion" in text and "-> 0.5" in text and "log_every" not in text
    caplog.clear()
    Trainer(cfg, run, resume="latest")._check_resume_config()  # the same config: silent
    assert not caplog.records
    # how the same tensors are computed may change (after running out of memory): a warning, not a refusal
    ckpt_on = copy.deepcopy(cfg)
    ckpt_on.model.gradient_checkpointing = True
    with caplog.at_level(logging.WARNING, logger="safe_av.training.loop"):
        Trainer(ckpt_on, run, resume="latest")._check_resume_config()
    assert "model.gradient_checkpointing: False -> True" in caplog.text
    # a key the checkpoint's config.yaml lacks (added to the code since) is its default: no change
    caplog.clear()
    import yaml

    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    saved = yaml.safe_load((latest / "config.yaml").read_text())
    del saved["curriculum"]["adaptive_compound"]
    (latest / "config.yaml").write_text(yaml.safe_dump(saved))
    Trainer(cfg, run, resume=str(latest))._check_resume_config()
    assert not caplog.records


class _Snapshots(Trainer):
    """Records every parameter at each phase start and at the end."""

    snaps: list

    def _start_phase(self, index):
        self.snaps = getattr(self, "snaps", [])
        self.snaps.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return super()._start_phase(index)

    def finish(self):
        self.snaps.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return super().finish()


def test_each_phase_changes_only_its_parameters(small_corpus, tmp_path):
    cfg = tiny_train_config(small_corpus, tmp_path, **{"data.feature_cache": f"{tmp_path}/features"})
    trainer = _Snapshots(cfg, tmp_path / "run")
    trainer.train()
    allowed = [("projector.",), ("projector.", "fusion."),
               ("projector.", "fusion.", "base.model.language_projection.")]
    for phase, prefixes in enumerate(allowed):
        before, after = trainer.snaps[phase], trainer.snaps[phase + 1]
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed, f"phase {phase + 1} changed nothing"
        assert all(n.startswith(prefixes) for n in changed), sorted(n for n in changed if not n.startswith(prefixes))
        assert {p for p in prefixes if any(n.startswith(p) for n in changed)} == set(prefixes)


class _NaNLoss(Trainer):
    def compute_loss(self, model, batch, w):
        loss, parts = super().compute_loss(model, batch, w)
        return loss * float("nan"), parts


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(small_corpus, tmp_path):
    from safe_av.training.loop import NonFiniteError

    cfg = tiny_train_config(small_corpus, tmp_path, **{"train.max_nonfinite": 3, "data.feature_cache": f"{tmp_path}/f"})
    trainer = _NaNLoss(cfg, tmp_path / "run")
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        trainer.train()
    assert trainer.state.skipped_steps == 3
    events = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in events if e.get("event") == "skipped_step"] == ["non-finite loss"] * 3
    assert all(torch.isfinite(v).all() for v in trainer.model.projector.state_dict().values())


def test_label_window_logits_leave_every_loss_part_unchanged(small_corpus, tmp_path):
    """model.label_logits_only: the LM head (student and teacher) runs only from the position before the
    first label; task, distillation and retention losses are the same as with logits everywhere."""
    from safe_av.data.text import move_batch

    cfg = tiny_train_config(small_corpus, tmp_path, **{"data.feature_cache": f"{tmp_path}/f",
                                                       "model.projector.dropout": 0.0, "model.fusion.dropout": 0.0})
    tr = Trainer(cfg, tmp_path / "run")
    tr.setup()
    tr.curriculum, tr.fisher = tr._build_curriculum(), None
    _, _, stream, _ = tr._start_phase(2)  # language_projection unfrozen: the teacher uses its anchor weights
    w = tr._weights(cfg.train.phases[2])
    assert w.beta > 0 and w.gamma > 0
    for _ in range(30):
        batch = stream.next()
        if not batch.get("empty") and bool(tr._distill_rows(batch).any()) and bool(batch["has_audio"].any()):
            break
    batch = move_batch(batch, tr.acc.device)
    assert tr.model.logits_start(batch) > 0
    parts = {}
    for on in (True, False):
        cfg.model.label_logits_only = on
        _, parts[on] = tr.compute_loss(tr.ddp_model, batch, w)
    assert {"task", "distill", "retention"} <= set(parts[True]) == set(parts[False])
    for k in parts[False]:
        torch.testing.assert_close(parts[True][k], parts[False][k], atol=1e-5, rtol=1e-5, msg=k)


def test_resume_truncation_drops_what_followed_the_checkpoint(tmp_path):
    """Records after the checkpoint's step go, and so does the next phase's start logged at the same step (a
    checkpoint at a phase's last step): the resumed run logs it again, once."""
    from safe_av.training.loop import _truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    records = [{"event": "phase_start", "step": 0, "phase": 1}, {"step": 4, "loss/total": 1.0},
               {"event": "phase_start", "step": 4, "phase": 2}, {"step": 5, "loss/total": 0.9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    _truncate_jsonl(log, 4, 0)  # checkpoint after step 4, the last of phase 1 (0-based 0)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:2]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    _truncate_jsonl(log, 4, 1)  # a checkpoint already inside phase 2 keeps its start
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]


def test_eval_max_samples_caps_a_training_runs_evaluation_sets(small_corpus, tmp_path):
    cfg = tiny_train_config(small_corpus, tmp_path, **{"train.pretrain.enabled": "false", "eval.max_samples": 3})
    metrics = Trainer(cfg, tmp_path / "run").train()
    # VQA: val without the 2 images (6 questions) of the 4 questions retention is tracked on, then capped
    long_avqa = metrics["eval_samples"]["avqa"].pop("truncated_audio")
    assert metrics["eval_samples"] == {"vqa": {"evaluated": 3, "skipped": 0, "held_out": 6, "truncated_audio": 0},
                                       "avqa": {"evaluated": 3, "skipped": 0, "held_out": 0}}
    assert 0 <= long_avqa <= 3
    assert metrics["eval_splits"] == {"vqa": "val", "avqa": "test", "selection": "val"}


def test_checkpoints_record_where_the_base_is_and_what_it_was(full_run):
    """meta.json of a training checkpoint has what adapter_config.json has, so an unfinished run loads from
    anywhere: the pretrained base's path, its family and the weight fingerprints."""
    _, tmp, _ = full_run
    adapter = json.loads((tmp / "run" / "adapter" / "adapter_config.json").read_text())
    for meta_file in (tmp / "run" / "checkpoints").glob("step-*/meta.json"):
        meta = json.loads(meta_file.read_text())
        assert meta["base_path"] and meta["base_path"] == adapter["base_path"]
        for key in ("base_family", "audio_kind", "base_fingerprint", "audio_encoder_fingerprint"):
            assert meta[key] == adapter[key], key


def test_final_metrics_never_use_what_the_training_evaluated_on(small_corpus, tmp_path, caplog):
    """Selection (the training's own evaluations) reads data.select_split; the final AVQA set is the test split,
    and the final VQA set (VQA v2 has no test answers: val) leaves out every image the retention subset uses.
    With AVQA's final split set to the selection split, the videos of every stage pool are left out too."""
    import logging

    from safe_av.data.formats import read
    from safe_av.training.data import sample_group

    def subsets(**kw):
        tr = Trainer(tiny_train_config(small_corpus, tmp_path, **{"train.pretrain.enabled": "false", **kw}),
                     tmp_path / "run")
        tr._prepare_data()
        tr._eval_subsets()
        return tr

    ids = {(d, sp): {s.id for s in read(d, small_corpus / d, sp).samples}
           for d in ("vqav2", "musicavqa") for sp in ("val", "test") if (d, sp) != ("vqav2", "test")}
    tr = subsets()
    assert tr.eval_splits == {"vqa": "val", "avqa": "test", "selection": "val"}
    assert {s.id for s in tr.vqa_subset} <= ids["vqav2", "val"] and len(tr.vqa_subset) == 4
    assert {s.id for s in tr.avqa_eval} == ids["musicavqa", "test"] and tr.held_out["avqa"] == 0
    pools = [s for pool in tr.stage_pools.values() for s in pool] + tr.audio_pool
    assert pools and {s.id for s in pools} <= ids["musicavqa", "val"] and len(tr.stage_pools) == 4
    # VQA: same split, so the subset's images (2 of the 3 val images, 3 questions each) are left out
    assert tr.held_out["vqa"] == 6 and len(tr.vqa_eval) == len(ids["vqav2", "val"]) - 6 > 0
    assert not {sample_group(s) for s in tr.vqa_eval} & {sample_group(s) for s in tr.vqa_subset}
    # AVQA reported on the selection split: no video of any pool reported
    tr = subsets(**{"data.eval_split": "val"})
    pools = [s for pool in tr.stage_pools.values() for s in pool] + tr.audio_pool
    assert tr.held_out["avqa"] > 0 and tr.held_out["avqa"] + len(tr.avqa_eval) == len(ids["musicavqa", "val"])
    assert not {sample_group(s) for s in tr.avqa_eval} & {sample_group(s) for s in pools}
    # nothing shared: nothing left out; a training split as a final split is allowed, with a warning
    with caplog.at_level(logging.WARNING, logger="safe_av.training.data"):
        tr = subsets(**{"data.vqa_eval_split": "train"})
    assert tr.held_out == {"vqa": 0, "avqa": 0} and tr.eval_splits["vqa"] == "train"
    assert "data.vqa_eval_split='train' is a training split: the final VQA metrics measure what was trained on" \
        in caplog.text


def test_a_resume_onto_other_evaluation_questions_rescores_the_original(full_run, tmp_path, monkeypatch):
    """The original model's VQA accuracy (retention's reference) is kept in the checkpoint with a digest of the
    questions it was measured on: the same questions are not rescored on resume, other ones (another split or
    subset size, or a checkpoint from before the digest) are, through the original-model view."""
    import copy
    import shutil

    cfg, tmp, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    scored = []
    real = Trainer._score_original_vqa
    monkeypatch.setattr(Trainer, "_score_original_vqa",
                        lambda self: scored.append([s.id for s in self.vqa_subset]) or real(self))
    Trainer(cfg, run, resume="latest").train()
    assert scored == []
    moved = copy.deepcopy(cfg)  # the same data read from another folder (a resume on another machine)
    moved.data.root = str(tmp_path / "moved")
    shutil.copytree(cfg.data.root, moved.data.root)
    Trainer(moved, run, resume="latest").train()
    assert scored == []
    changed = copy.deepcopy(cfg)
    changed.curriculum.eval_samples = 1
    tr = Trainer(changed, run, resume="latest")
    tr.train()
    assert len(scored) == 1 and len(scored[0]) == 1
    assert tr.state.original_vqa_questions == tr._vqa_questions_digest()
    assert json.loads((run / "metrics.json").read_text())["eval_samples"]["vqa"]["held_out"] == 3


def test_safe_eval_of_a_run_scores_its_final_questions(full_run, tmp_path):
    """`safe eval` of a finished run, with the run's config, scores exactly the questions of the run's final
    metrics (same splits, same held-out images and videos) and gets the same answers."""
    from safe_av.config import load_config
    from safe_av.eval.run import evaluate_checkpoint

    _, tmp, metrics = full_run
    run = tmp / "run"
    cfg = load_config(run / "config.yaml")
    result = evaluate_checkpoint(cfg, str(run), split=None, output=str(tmp_path / "eval.json"))
    assert result["splits"]["vqa"] == metrics["eval_splits"]["vqa"] and result["selection_split"] == "val"
    assert result["held_out"] == {k: metrics["eval_samples"][k]["held_out"] for k in ("vqa", "avqa")}
    assert result["n_evaluated"]["vqa"] == metrics["eval_samples"]["vqa"]["evaluated"] > 0
    assert result["n_evaluated"]["avqa"] == metrics["eval_samples"]["avqa"]["evaluated"] > 0

    def answers(path, set_name):
        return {r["id"]: r["prediction"] for r in map(json.loads, Path(path).read_text().splitlines())
                if r["set"] == set_name and r["condition"] == "safe"}

    for set_name in ("vqa", "avqa"):
        assert answers(result["predictions_file"], set_name) == answers(run / "predictions.jsonl", set_name)
    assert result["safe_vqa_accuracy"] == pytest.approx(metrics["safe_vqa_accuracy"])
    assert result["avqa_accuracy"] == pytest.approx(metrics["avqa_accuracy"])


class _Overflow(Trainer):
    """Multiplies the loss by 1e36 on the steps in ``blow_up``: the scaled gradients overflow, the loss does not."""

    blow_up: set = set()

    def compute_loss(self, model, batch, w):
        loss, parts = super().compute_loss(model, batch, w)
        k = 1e36 if self.state.global_step in self.blow_up else 1.0
        return loss * k, {name: v * k for name, v in parts.items()}


def test_fp16_loss_scaling_unscales_before_clipping_and_lowers_the_scale_on_overflow(small_corpus, tmp_path,
                                                                                    monkeypatch):
    """fp16 with one process: the optimizer goes through accelerate, so the gradient norm is measured and clipped on
    unscaled gradients, and an overflowing step is skipped by the GradScaler, which lowers its scale, without counting
    toward train.max_nonfinite (accelerate's CUDA fp16 set-up, mimicked on CPU with a CPU GradScaler)."""
    from accelerate import Accelerator

    cfg = tiny_train_config(small_corpus, tmp_path, **{"data.feature_cache": f"{tmp_path}/f", "train.max_nonfinite": 1})
    tr = _Overflow(cfg, tmp_path / "run")
    tr.setup()
    tr.curriculum, tr.fisher = tr._build_curriculum(), None
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    monkeypatch.setattr(tr.acc, "native_amp", True)
    monkeypatch.setattr(tr.acc, "scaler", torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    tr._start_phase(0)  # an earlier phase's optimizer (the projector trains in both): it must not unscale again
    optim, sched, stream, _ = tr._start_phase(1)
    assert tr.acc._optimizers == [optim]
    w = tr._weights(cfg.train.phases[1])
    logs = tr._optimizer_step(tr.ddp_model, optim, sched, stream, w)
    assert logs is not None and 0 < logs["grad_norm"] < 100  # x65536 before the fix: clipped every step
    assert tr.model.projector.projection[0].weight.grad is None  # stepped and zeroed
    assert tr.acc.scaler.get_scale() == 2.0 ** 16
    tr.blow_up = {tr.state.global_step}
    assert tr._optimizer_step(tr.ddp_model, optim, sched, stream, w) is None
    assert tr.acc.scaler.get_scale() == 2.0 ** 15 and tr.state.nonfinite_in_a_row == 0
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["reason"] == "fp16 gradient overflow (loss scale lowered to 32768)"
    tr.blow_up = set()
    assert tr._optimizer_step(tr.ddp_model, optim, sched, stream, w) is not None  # no "unscale_() already called"


def test_a_step_reports_the_rate_it_used_and_the_audio_it_held(small_corpus, tmp_path):
    """The logged lr/<group> is the rate of the update just made (it was read after the scheduler moved on: the
    first warmup step logged 2/2 of the base rate instead of 1/2), and audio_fraction is the step's own mix."""
    cfg = tiny_train_config(small_corpus, tmp_path, **{"data.feature_cache": f"{tmp_path}/f"})
    tr = Trainer(cfg, tmp_path / "run")
    tr.setup()
    tr.curriculum, tr.fisher = tr._build_curriculum(), None
    optim, sched, stream, _ = tr._start_phase(2)  # 4 steps: a 2-step warmup to projector's 1e-3
    w = tr._weights(cfg.train.phases[2])
    first = tr._optimizer_step(tr.ddp_model, optim, sched, stream, w)
    second = tr._optimizer_step(tr.ddp_model, optim, sched, stream, w)
    assert first["_lrs"]["lr/projector"] == pytest.approx(5e-4)
    assert second["_lrs"]["lr/projector"] == pytest.approx(1e-3)
    optim, sched, stream, _ = tr._start_phase(0)  # AudioCaps: every sample has audio
    assert tr._optimizer_step(tr.ddp_model, optim, sched, stream, tr._weights(cfg.train.phases[0]))[
        "audio_fraction"] == 1.0


class _Sequence:
    """Stands in for a BatchStream: returns the given collated batches in order."""

    def __init__(self, batches):
        self.batches, self.audio_ratio = list(batches), 1.0

    def next(self):
        return dict(self.batches.pop(0))


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_them_all(small_corpus, tmp_path):
    """grad_accum=2 over micro-batches of 1 and 3 samples gives the gradient of the 4-sample batch (the mean of the
    two micro-batch means weighted the lone sample's tokens three times too much), distillation and retention
    included: each part is weighted by its share of its own tokens (the distilled rows' for those two)."""
    cfg = tiny_train_config(small_corpus, tmp_path, **{"data.feature_cache": f"{tmp_path}/f", "model.projector.dropout": 0.0,
                                                       "model.fusion.dropout": 0.0, "train.optim.grad_clip": 1.0e9})
    tr = Trainer(cfg, tmp_path / "run")
    tr.setup()
    tr.curriculum, tr.fisher = tr._build_curriculum(), None
    optim, sched, stream, _ = tr._start_phase(1)
    w = tr._weights(cfg.train.phases[1])
    data = stream.dataset
    from safe_av.training.loop import _image_question_meta

    audio = [i for i in range(len(data)) if data.samples[i].audio]
    image_q = [i for i in audio if _image_question_meta(data[i]["meta"])]  # distilled: answers must not need audio
    other = [i for i in audio if i not in image_q]
    items = [data[i] for i in (other[0], image_q[0], other[1], image_q[1])]  # the lone sample is not distilled
    assert w.gamma > 0 and w.beta > 0
    grads = []
    original_step = optim.step

    def record(*a, **k):
        grads.append({n: p.grad.clone() for n, p in tr.model.trainable_parameters().items() if p.grad is not None})
        return original_step(*a, **k)

    optim.step = record
    state = {n: p.detach().clone() for n, p in tr.model.trainable_parameters().items()}
    for accum, parts in ((1, [items]), (2, [items[:1], items[1:]])):
        cfg.train.optim.grad_accum = accum
        with torch.no_grad():
            for n, p in tr.model.trainable_parameters().items():
                p.copy_(state[n])
        logs = tr._optimizer_step(tr.ddp_model, optim, sched, _Sequence([tr.processor.collate(p) for p in parts]), w)
        assert logs is not None and {"loss/distill", "loss/retention"} <= set(logs)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4, msg=n)
