"""Training and its evaluation when media files cannot be read: skipped, counted, reported; never a crash."""

import json
import shutil
from pathlib import Path

import pytest

from safe_av.data.formats import read
from safe_av.training import loop
from safe_av.training.loop import DataUnreadableError, Trainer
from tests.integration.conftest import tiny_train_config


def _corpus_without(small_corpus, tmp_path, dataset: str, *splits: str):
    """A copy of the small corpus with every audio file of ``dataset``'s ``splits`` deleted; their number."""
    root = tmp_path / "corpus"
    shutil.copytree(small_corpus, root)
    files = {s.audio for split in splits for s in read(dataset, root / dataset, split).samples if s.audio}
    for f in files:
        Path(f).unlink()
    return root, len(files)


def _cfg(root, tmp_path, **kw):
    return tiny_train_config(root, tmp_path, **{"train.pretrain.enabled": "false", **kw})


def test_steps_without_a_loadable_sample_are_skipped_then_stop_with_a_clear_error(small_corpus, tmp_path,
                                                                                 monkeypatch):
    root, n = _corpus_without(small_corpus, tmp_path, "audiocaps", "train")
    assert n == 4  # phase 1 trains on these clips only: every batch is empty
    # a few empty steps: skipped and counted, the run goes on to the phases whose data loads
    monkeypatch.setattr(loop, "EMPTY_STEPS_LIMIT", 100)
    metrics = Trainer(_cfg(root, tmp_path, **{"train.phases.0.max_steps": 3}), tmp_path / "a").train()
    assert metrics["skipped_steps"] == 3 and metrics["skipped_samples"] >= 12
    events = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "skipped_step"]
    assert [e["step"] for e in skipped] == [1, 2, 3] and "could be loaded" in skipped[0]["reason"]
    # a run of them: the data cannot be read, said plainly instead of a KeyError deep in the loop
    monkeypatch.setattr(loop, "EMPTY_STEPS_LIMIT", 5)
    with pytest.raises(DataUnreadableError, match=r"phase 'p1': 5 optimizer steps in a row had no loadable sample "
                                                  r"\(20 samples skipped so far\) from datasets \['audiocaps'\]"):
        Trainer(_cfg(root, tmp_path, **{"train.phases.0.max_steps": 8}), tmp_path / "b").train()


def test_unreadable_evaluation_clips_are_counted_and_the_adapter_is_kept(small_corpus, tmp_path):
    """Every MUSIC-AVQA evaluation clip missing (the selection split's and the final split's): the curriculum's
    stage evaluations find nothing to score (no division by zero), the final AVQA metrics are null with the skip
    counted, and the adapter is saved."""
    root, n = _corpus_without(small_corpus, tmp_path, "musicavqa", "val", "test")
    assert n == 2
    n_test = len(read("musicavqa", root / "musicavqa", "test").samples)
    run = tmp_path / "run"
    metrics = Trainer(_cfg(root, tmp_path), run).train()
    assert (run / "adapter" / "adapter.safetensors").is_file()
    saved = json.loads((run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["eval_samples"]["avqa"] == {"evaluated": 0, "skipped": n_test, "held_out": 0, "truncated_audio": 0}
    assert saved["eval_samples"]["vqa"]["skipped"] == 0 and saved["eval_samples"]["vqa"]["evaluated"] > 0
    assert saved["eval_skipped_samples"] == n_test > 0
    for key in ("avqa_accuracy", "audio_dependent_accuracy", "audio_masked_avqa_accuracy",
                "audio_shuffled_avqa_accuracy"):
        assert saved[key] is None, key
    assert saved["safe_vqa_accuracy"] is not None and metrics["eval_samples"] == saved["eval_samples"]
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/" in x]
    assert evals and all(e.get("eval/stage_audio_accuracy") is None for e in evals)


def test_a_later_phase_without_data_fails_before_the_first_phase_trains(small_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(small_corpus, root)
    for f in (root / "musicavqa" / "json").glob("*train*.json"):
        f.write_text("[]")  # phases 2 and 3 train on MUSIC-AVQA (and VQA v2)
    cfg = _cfg(root, tmp_path, **{"train.phases.1.datasets": "{musicavqa: 1.0}"})
    with pytest.raises(ValueError, match=r"phase 'p2': no training samples for datasets \['musicavqa'\]"):
        Trainer(cfg, tmp_path / "run").train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_too_few_samples_for_a_batch_name_the_phase(small_corpus, tmp_path):
    cfg = _cfg(small_corpus, tmp_path, **{"train.phases.0.batch_size": 16})  # 4 AudioCaps training clips
    with pytest.raises(ValueError, match=r"phase 'p1': 4 training sample\(s\) in datasets \['audiocaps'\] under "
                                         r".*fewer than one batch \(16 x 1 process\(es\)\)"):
        Trainer(cfg, tmp_path / "run").train()


def test_fisher_passes_over_batches_without_a_loadable_image(small_corpus, tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    shutil.copytree(small_corpus, root)
    cfg = _cfg(root, tmp_path, **{"loss.fisher_batches": 3})
    # the first two batches come out empty (none of their images loads): passed over, three real ones used
    from safe_av.training.data import BatchStream

    real_next, calls = BatchStream.next, []

    def next_(self):
        calls.append(1)
        batch = real_next(self)
        return {"empty": True, "skipped": 8, "audio_truncated": 0} if len(calls) <= 2 else batch

    monkeypatch.setattr(BatchStream, "next", next_)
    used = []
    real_estimate = loop.estimate_fisher
    monkeypatch.setattr(loop, "estimate_fisher",
                        lambda fn, params, batches, **kw: real_estimate(fn, params, (used.append(b) or b
                                                                                      for b in batches), **kw))
    trainer = Trainer(cfg, tmp_path / "some")
    trainer.setup()
    trainer._setup_fisher()
    assert trainer.fisher and len(used) == 3 and len(calls) == 5 and all("input_ids" in b for b in used)
    monkeypatch.undo()
    for f in {s.image for s in read("vqav2", root / "vqav2", "train").samples}:  # every image: a clear error
        Path(f).write_bytes(b"not an image")
    trainer = Trainer(cfg, tmp_path / "none")
    trainer.setup()
    with pytest.raises(DataUnreadableError, match=r"Fisher: 10 batches of VL training samples in a row had no "
                                                  r"loadable sample \(datasets \['vqav2'\]"):
        trainer._setup_fisher()


def test_retention_compares_the_same_questions_when_an_image_fails(small_corpus, tmp_path, monkeypatch):
    """The original accuracy of the held-out subset is taken over the subset's questions that load, as the
    retention that divides by it: an untouched model's retention is exactly 1 (it used to take the first n
    loaded records, one question past the subset when an early image failed)."""
    trainer = Trainer(_cfg(small_corpus, tmp_path, **{"curriculum.eval_samples": 3}), tmp_path / "run")
    trainer.setup()
    trainer._eval_subsets()
    subset = trainer.vqa_subset
    assert len(subset) == 3
    failed = subset[0]  # its image does not load: no record

    def predict(samples, **kw):  # right on the subset's last question only
        right = {(subset[2].dataset, subset[2].id)}
        return [{"dataset": s.dataset, "id": s.id, "answers": s.answers,
                 "prediction": s.answers[0] if (s.dataset, s.id) in right else "wrong-answer"}
                for s in samples if s is not failed]

    monkeypatch.setattr(trainer, "_predict", predict)
    trainer._score_original_vqa()
    # subset = questions 0-2; 0 failed; 1 wrong, 2 right: 0.5 (over all three, or the first 3 loaded, 1/3)
    assert trainer.state.original_vqa_subset == pytest.approx(0.5, abs=0.01)
    assert trainer._retention() == 1.0
