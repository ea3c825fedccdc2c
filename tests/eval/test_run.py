"""``safe eval`` / ``safe infer`` / ``safe_av.api`` on fake runs: tiny models saved without training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safe_av import api
from safe_av.cli import main as cli
from safe_av.config import SAFEConfig, save_config
from safe_av.data.text import SAFEProcessor
from safe_av.eval import evaluate as ev
from safe_av.eval.run import InputError, evaluate_checkpoint, locate_checkpoint
from safe_av.models.build import build_audio_encoder, build_base, build_safe_model

EXPECTED_KEYS = {
    "checkpoint", "checkpoint_kind", "weights", "base", "base_path", "split", "n_samples", "n_evaluated",
    "original_vqa_accuracy", "safe_vqa_accuracy", "vl_retention", "feature_similarity",
    "avqa_accuracy", "avqa_accuracy_by_type", "avqa_accuracy_by_question_type", "audio_dependent_accuracy",
    "temporal_accuracy", "audio_masked_avqa_accuracy", "audio_masked_audio_dependent_accuracy",
    "audio_shuffled_avqa_accuracy", "audio_shuffled_audio_dependent_accuracy", "original_avqa_accuracy",
    "avqa_chance_accuracy", "avqa_majority_accuracy", "audio_dependent_chance_accuracy",
    "audio_dependent_majority_accuracy", "audio_gain", "caption_metrics", "retrieval", "predictions_file",
    "skipped_samples", "missing_datasets",
}


@pytest.fixture(scope="module")
def same_audio_corpus(corpus, tmp_path_factory):
    """The corpus with every MUSIC-AVQA clip replaced by the same file."""
    root = tmp_path_factory.mktemp("same_audio") / "data"
    shutil.copytree(corpus, root)
    clips = sorted((root / "musicavqa" / "audio").glob("*.wav"))
    for clip in clips[1:]:
        shutil.copyfile(clips[0], clip)
    return root


def make_cfg(root: Path) -> SAFEConfig:
    cfg = SAFEConfig()
    cfg.data.root = str(root)
    cfg.model.num_audio_tokens = 4
    cfg.model.projector.hidden_dim = 32
    cfg.model.fusion.num_heads = 4
    cfg.train.pretrain.enabled = False  # the base is the random tiny preset, deterministic from model.tiny_seed
    cfg.train.trackers = []
    cfg.eval.batch_size = 16
    cfg.eval.max_new_tokens = 3
    cfg.curriculum.eval_samples = 3  # the run's selection: one of the 3 VQA val images (its 3 questions)
    return cfg


def open_gates(model) -> None:
    """Make the adapter do something: open the fusion gates."""
    with torch.no_grad():
        model.fusion.attn_gate.fill_(1.0)
        model.fusion.ffn_gate.fill_(1.0)


def fake_run(folder: Path, cfg: SAFEConfig, *, unfreeze=()) -> Path:
    torch.manual_seed(0)
    model = build_safe_model(cfg.model, unfreeze=unfreeze)
    open_gates(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    model.save_pretrained(folder / "adapter", extra_config={"base": cfg.model.base,
                                                            "audio_encoder": cfg.model.audio_encoder})
    return folder


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("run") / "run", make_cfg(corpus))


def read_predictions(path) -> dict:
    """(set, condition) -> {id: prediction}."""
    out: dict = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        out.setdefault((r["set"], r["condition"]), {})[r["id"]] = r["prediction"]
    return out


def test_random_tiny_base_is_deterministic(corpus):
    cfg = make_cfg(corpus)
    a, b = build_base(cfg.model), build_base(cfg.model)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_locate_checkpoint_kinds_and_errors(run, tmp_path):
    assert locate_checkpoint(run).kind == "run"
    assert locate_checkpoint(run / "adapter").kind == "adapter"
    assert locate_checkpoint(run / "adapter").config == run / "config.yaml"
    with pytest.raises(FileNotFoundError, match="not found"):
        locate_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        locate_checkpoint(tmp_path)


def test_safe_eval_cli_writes_metrics_and_predictions(run, corpus, tmp_path, capsys):
    out = tmp_path / "eval" / "metrics.json"
    assert cli(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert EXPECTED_KEYS <= set(result)
    assert printed["avqa_accuracy"] == result["avqa_accuracy"]
    assert result["split"] is None and result["checkpoint_kind"] == "run" and result["base_path"] is None
    # the final splits by default; the VQA questions the run's training evaluated on are left out
    assert result["splits"] == {"vqa": "val", "avqa": "test", "caption": "test"}
    assert result["selection_split"] == "val" and result["held_out"] == {"vqa": 3, "avqa": 0}
    assert result["n_samples"]["vqa"] == 6
    assert result["n_evaluated"] == result["n_samples"] and result["skipped_samples"] == 0
    assert set(result["avqa_accuracy_by_type"]) >= {"Audio (avg)", "Visual (avg)", "AV (avg)", "Overall"}
    assert set(result["caption_metrics"]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    assert "skipped" in result["retrieval"]  # one val clip: nothing to rank
    assert 0.0 <= result["avqa_chance_accuracy"] <= 1.0

    preds = read_predictions(result["predictions_file"])
    assert result["predictions_file"] == str(tmp_path / "eval" / "metrics.predictions.jsonl")
    assert set(preds) == {("vqa", "safe"), ("vqa", "original"), ("avqa", "safe"), ("avqa", "audio_removed"),
                          ("avqa", "audio_shuffled"), ("avqa", "original"), ("caption", "safe")}
    # nothing in the base was unfrozen: audio removed is the original model, sample by sample
    assert preds[("avqa", "audio_removed")] == preds[("avqa", "original")]
    assert result["audio_masked_avqa_accuracy"] == result["original_avqa_accuracy"]
    # and VQA (no audio) is untouched: retention exactly 1 wherever it is defined, features identical
    assert preds[("vqa", "safe")] == preds[("vqa", "original")]
    assert result["feature_similarity"] == pytest.approx(1.0, abs=1e-6)
    # the audio does reach the answers (otherwise the equalities above would say nothing)
    assert preds[("avqa", "safe")] != preds[("avqa", "audio_removed")]

    # the loaded model is the saved one around the same base: same answers as the in-memory model
    cfg = make_cfg(corpus)
    torch.manual_seed(0)
    model = build_safe_model(cfg.model, base=build_base(cfg.model), audio_encoder=build_audio_encoder(cfg.model))
    open_gates(model)
    proc = SAFEProcessor.from_model(model)
    from safe_av.training.data import read_corpus

    avqa = read_corpus(cfg.data, ["musicavqa"], "test").samples
    recs = ev.predict(model.eval(), proc, avqa, batch_size=16, max_new_tokens=3)
    assert {r["id"]: r["prediction"] for r in recs} == preds[("avqa", "safe")]


def test_feature_similarity_runs_in_eval_mode_and_restores_the_mode(corpus, monkeypatch):
    """The trainer calls it on its training model: every forward (student and teacher) must see eval mode
    (no LoRA/adapter dropout in the measurement), and the model goes back to training mode after."""
    from safe_av.eval import evaluate as ev
    from safe_av.training.data import read_corpus

    cfg = make_cfg(corpus)
    torch.manual_seed(0)
    model = build_safe_model(cfg.model)
    modes = []
    for name in ("forward", "teacher_forward"):
        orig = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _orig=orig, **k: modes.append(model.training) or _orig(*a, **k))
    model.train()
    vqa = read_corpus(cfg.data, ["vqav2"], "val").samples[:4]
    value = ev.feature_similarity(model, SAFEProcessor.from_model(model), vqa)
    assert value == pytest.approx(1.0, abs=1e-6)  # nothing in the base trained
    assert modes and not any(modes) and model.training


def test_shuffled_audio_equals_full_when_all_clips_are_identical(same_audio_corpus, tmp_path):
    cfg = make_cfg(same_audio_corpus)
    run_dir = fake_run(tmp_path / "run", cfg)
    cfg.data.caption_dataset = ""  # only AVQA and VQA here
    result = evaluate_checkpoint(cfg, str(run_dir / "adapter"), split=None, output=str(tmp_path / "m.json"))
    preds = read_predictions(result["predictions_file"])
    assert len(preds[("avqa", "safe")]) > 1
    assert preds[("avqa", "audio_shuffled")] == preds[("avqa", "safe")]
    assert result["audio_shuffled_avqa_accuracy"] == result["avqa_accuracy"]
    assert result["audio_gain"]["avqa_vs_audio_shuffled"] == 0.0
    assert "caption_metrics" not in result and result["checkpoint_kind"] == "adapter"


def test_training_checkpoint_with_unfrozen_base_uses_original_weights(corpus, tmp_path):
    """A checkpoint whose adapter state changed language_projection: "original" is the untouched base."""
    cfg = make_cfg(corpus)
    cfg.train.phases[-1].train = ["projector", "fusion", "base"]
    cfg.train.phases[-1].unfreeze = ["language_projection"]
    cfg.train.phases[-1].lr = {"projector": 1e-4, "fusion": 1e-4, "base": 1e-4}
    cfg.data.caption_dataset = ""
    cfg.eval.max_samples = 6
    torch.manual_seed(0)
    model = build_safe_model(cfg.model, unfreeze=["language_projection"])
    with torch.no_grad():
        proj = model.base.model.language_projection
        proj.weight.add_(5 * torch.randn_like(proj.weight))
        proj.bias.add_(5 * torch.randn_like(proj.bias))
    step = tmp_path / "run" / "checkpoints" / "step-0000003"
    step.mkdir(parents=True)
    save_file(model.adapter_state_dict(), str(step / "model.safetensors"))
    save_config(cfg, step / "config.yaml")
    assert any(k.endswith("language_projection.weight") for k in model.adapter_state_dict())

    result = evaluate_checkpoint(cfg, str(step), split=None, output=str(tmp_path / "m.json"))
    assert result["checkpoint_kind"] == "checkpoint"
    preds = read_predictions(result["predictions_file"])

    pristine = build_safe_model(cfg.model)  # the same random base, never modified
    proc = SAFEProcessor.from_model(pristine)
    from safe_av.training.data import held_out, read_corpus, selection

    val = read_corpus(cfg.data, ["vqav2"], "val").samples
    # VQA: val without the questions the run's own evaluations read (tested above); AVQA: test
    vqa = held_out(selection(cfg, read_corpus(cfg.data, ["vqav2"], "val")).vqa_subset, val, same_split=True)[0]
    avqa = read_corpus(cfg.data, ["musicavqa"], "test").samples
    for questions, key in ((vqa[:6], "vqa"), (avqa[:6], "avqa")):
        assert questions
        recs = ev.predict(pristine.eval(), proc, questions, batch_size=16, max_new_tokens=3, use_audio=False)
        assert {r["id"]: r["prediction"] for r in recs} == preds[(key, "original")]
    # SAFE itself runs with the changed projection
    assert preds[("vqa", "safe")] != preds[("vqa", "original")]


# ------------------------------------------------------------------ safe infer / the API


@pytest.fixture(scope="module")
def media(corpus):
    frames = sorted((corpus / "musicavqa" / "frames").iterdir())[0]
    image = sorted(frames.glob("*.jpg"))[0]
    audio = sorted((corpus / "musicavqa" / "audio").glob("*.wav"))[0]
    return image, audio


@pytest.fixture(scope="module")
def loaded(run):
    return api.load(run, max_new_tokens=4)


def test_infer_single_question(run, media, capsys, loaded):
    image, audio = media
    rc = cli(["infer", "--checkpoint", str(run), "--image", str(image), "--audio", str(audio),
              "--question", "Which instrument is playing?", "--max-new-tokens", "4"])
    assert rc == 0
    answer = capsys.readouterr().out.strip()
    assert answer == loaded.answer("Which instrument is playing?", image=image, audio=audio)


def test_infer_empty_question_asks_for_a_caption(run, media, capsys, loaded):
    _, audio = media
    rc = cli(["infer", "--checkpoint", str(run), "--audio", str(audio), "--question", "", "--max-new-tokens", "4"])
    assert rc == 0  # not a usage error: "" is the captioning prompt, as in the API
    assert capsys.readouterr().out.strip() == loaded.answer("", audio=audio)


def test_infer_single_missing_file(run, media, tmp_path, capsys):
    image, _ = media
    rc = cli(["infer", "--checkpoint", str(run), "--image", str(image), "--audio", str(tmp_path / "gone.wav"),
              "--question", "What sounds?"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "gone.wav" in err and "'audio'" in err and "not found" in err


def test_infer_usage_errors(run, capsys, tmp_path):
    assert cli(["infer", "--checkpoint", str(run)]) == 2
    assert "--question" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"question": "?"}\n')
    assert cli(["infer", "--checkpoint", str(run), "--question", "?", "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "not both" in capsys.readouterr().err


def test_infer_jsonl_reports_bad_lines_and_goes_on(run, media, tmp_path, capsys, loaded):
    image, audio = media
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    shutil.copyfile(audio, tmp_path / "clip.wav")
    lines = [
        json.dumps({"image": str(image), "audio": str(audio), "question": "How many instruments are sounding?"}),
        json.dumps({"image": str(image), "question": "What is on the left?"}),
        json.dumps({"audio": "clip.wav", "question": "Is a piano playing?"}),  # relative to the JSONL's folder
        "[1, 2]",
        json.dumps({"image": str(image)}),
        json.dumps({"audio": str(tmp_path / "missing.wav"), "question": "What sounds?"}),
        json.dumps({"image": str(corrupt), "question": "What colour?"}),
        "{not json",
        "",
        '{"question": "caf\udce9"}',  # a latin-1 byte: that line fails, the others are answered
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    out = tmp_path / "out" / "answers.jsonl"
    rc = cli(["infer", "--checkpoint", str(run), "--input", str(src), "--output", str(out), "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 1
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert [("answer" in r) for r in records] == [True, True, True, False, False, False, False, False, False]
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert errors[4].startswith(f"{src}:4:") and "JSON object" in errors[4]
    assert errors[5].startswith(f"{src}:5:") and "'question' is missing" in errors[5]
    assert errors[6].startswith(f"{src}:6:") and "'audio'" in errors[6] and "missing.wav" in errors[6]
    assert errors[7].startswith(f"{src}:7:") and "'image'" in errors[7] and "corrupt" in errors[7]
    assert errors[8].startswith(f"{src}:8:") and "not valid JSON" in errors[8]
    assert errors[10] == f"{src}:10: not UTF-8 (byte 0xe9 at column 18)"
    assert "answered 3 of 9 lines, 6 failed" in err
    assert records[0]["answer"] == loaded.answer("How many instruments are sounding?", image=image, audio=audio)
    assert records[1]["answer"] == loaded.answer("What is on the left?", image=image)
    assert records[2]["audio"] == "clip.wav"  # echoed as written, though read from the JSONL's folder
    assert records[2]["answer"] == loaded.answer("Is a piano playing?", audio=tmp_path / "clip.wav")


def test_api_answer_and_batch(run, media, loaded):
    image, audio = media
    assert isinstance(loaded.answer("Which instrument is playing?", image=str(image), audio=str(audio)), str)
    requests = [{"image": str(image), "audio": str(audio), "question": "Is the flute playing?"},
                {"image": str(image), "question": "How many instruments are there?"},
                {"audio": str(audio), "question": ""}]
    batch = loaded.answer_batch(requests)
    assert batch == [loaded.answer(**r) for r in requests]
    with pytest.raises(InputError, match=r"requests\[1\]: field 'question' is missing"):
        loaded.answer_batch([requests[0], {"image": str(image)}])
    with pytest.raises(InputError, match="requests\\[0\\]: field 'image'.*nope.jpg"):
        loaded.answer_batch([{"image": "nope.jpg", "question": "?"}])


def test_finds_the_pretrained_tiny_base_and_audio_encoder_training_used(corpus, tmp_path):
    """Without paths recorded, the base and the audio encoder are found where training cached them."""
    from safe_av.eval.run import CheckpointFiles, resolve_audio_encoder, resolve_base
    from safe_av.training.loop import Trainer

    cfg = make_cfg(corpus)
    cfg.train.pretrain.enabled = True
    cfg.train.pretrain.epochs = 0.1
    cfg.train.pretrain.batch_size = 8
    cfg.train.pretrain.cache_dir = str(tmp_path / "base")
    cfg.train.pretrain.audio.enabled = True
    cfg.train.pretrain.audio.clips = 32
    cfg.train.pretrain.audio.epochs = 1
    trainer = Trainer(cfg, tmp_path / "run")
    trainer._prepare_data()
    trainer._build_model()
    built = sorted(p for p in (tmp_path / "base").iterdir() if (p / "DONE").is_file())
    assert [p.name.split("-")[1] for p in built] == ["blip2", "clap"]  # tiny-blip2-opt-<key>, tiny-clap-<key>
    files = CheckpointFiles("adapter", tmp_path / "run" / "adapter", None, {})
    assert resolve_base(cfg, files) == str(built[0])  # allow_pretrain=False: found, not re-made
    assert resolve_audio_encoder(cfg, files) == str(built[1]) == str(trainer.audio_path)
    with pytest.raises(FileNotFoundError, match="audio encoder"):
        cfg.train.pretrain.audio.seed += 1  # another recipe: not in the cache, and eval may not train
        resolve_audio_encoder(cfg, files)
    recorded = CheckpointFiles("adapter", tmp_path, None, {"base_path": str(built[0])})
    assert resolve_base(cfg, recorded) == str(built[0])
    cfg.train.pretrain.lr = 1.0  # another recipe: another key, not in the cache
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        resolve_base(cfg, files)


def test_likelihood_retrieval(run, corpus):
    from safe_av.eval.run import caption_retrieval
    from safe_av.training.data import read_corpus

    model = api.load(run)
    clips = read_corpus(make_cfg(corpus).data, ["audiocaps"], "train").samples
    out = caption_retrieval(model.model, model.processor, clips, max_clips=3)
    assert out["n_audio"] == 3 and out["n_text"] == sum(len(s.answers) for s in clips[:3])
    for direction in ("audio_to_text", "text_to_audio"):
        assert set(out[direction]) == {"R@1", "R@5", "R@10", "mAP@10"}
        assert 0.0 <= out[direction]["R@1"] <= 1.0
    assert out["text_to_audio"]["R@5"] == 1.0  # 3 clips: every one is in the top 5
    assert out["chance"]["text_to_audio"]["R@1"] == pytest.approx(1 / 3)
    assert "skipped" in caption_retrieval(model.model, model.processor, clips[:1])


def _damaged_copy(corpus, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(corpus, root)
    return root


def test_safe_eval_scores_every_condition_on_the_questions_that_loaded(run, corpus, tmp_path, capsys):
    """One MUSIC-AVQA clip unreadable and one annotation malformed: the clip's questions are skipped and counted,
    and the audio-removed / shuffled / original conditions and the baselines use exactly the questions that
    loaded (the shuffled condition used to rotate the bad file in and score another set)."""
    from safe_av.data.formats import read

    root = _damaged_copy(corpus, tmp_path)
    samples = read("musicavqa", root / "musicavqa", "train").samples
    bad_clip = samples[0].audio
    Path(bad_clip).write_bytes(b"junk")
    ann = root / "musicavqa" / "json" / "avqa-train.json"
    entries = json.loads(ann.read_text())
    entries[-1]["anser"] = None
    ann.write_text(json.dumps(entries))
    out = tmp_path / "m.json"
    rc = cli(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run), "--output", str(out),
              "--split", "train", "--set", f"data.root={root}", "data.caption_dataset=null"])
    assert rc == 0
    result = json.loads(out.read_text())
    n_bad = sum(s.audio == bad_clip for s in samples)
    assert n_bad > 0 and result["bad_annotations"] == 1
    assert result["n_samples"]["avqa"] == len(samples) - 1
    assert result["n_evaluated"]["avqa"] == len(samples) - 1 - n_bad
    assert result["skipped_samples"] == n_bad + result["n_samples"]["vqa"] - result["n_evaluated"]["vqa"]
    preds = read_predictions(result["predictions_file"])
    ids = {c: set(p) for (s, c), p in preds.items() if s == "avqa"}
    assert ids["safe"] == ids["audio_removed"] == ids["audio_shuffled"] == ids["original"]
    assert len(ids["safe"]) == result["n_evaluated"]["avqa"]


def test_safe_eval_without_any_evaluation_data_is_an_error(run, tmp_path, capsys):
    rc = cli(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run), "--output",
              str(tmp_path / "m.json"), "--split", "vall"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nothing to evaluate in split 'vall'" in err and "musicavqa" in err
    assert not (tmp_path / "m.json").exists()


def test_safe_eval_where_no_sample_loads_exits_1(run, corpus, tmp_path, capsys):
    from safe_av.data.formats import read

    root = _damaged_copy(corpus, tmp_path)
    for name, split in (("musicavqa", "test"), ("vqav2", "val")):  # the default final splits
        for s in read(name, root / name, split).samples:
            for f in (s.audio, s.image):
                if f and Path(f).is_file():
                    Path(f).write_bytes(b"junk")
    rc = cli(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run), "--output",
              str(tmp_path / "m.json"), "--set", f"data.root={root}", "data.caption_dataset=null"])
    assert rc == 1
    assert "none of the" in capsys.readouterr().err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n_evaluated"] == {"vqa": 0, "avqa": 0} and result["avqa_accuracy"] is None


def test_safe_eval_of_a_run_from_before_select_split_holds_out_its_eval_split(run, corpus, tmp_path):
    """A run whose config.yaml has no data.select_split evaluated on its data.eval_split during training: that is
    the split whose chosen-on questions are left out."""
    import yaml

    old = tmp_path / "old"
    shutil.copytree(run, old)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    for key in ("select_split", "vqa_eval_split"):
        raw["data"].pop(key)
    raw["data"]["eval_split"] = "test"
    (old / "config.yaml").write_text(yaml.safe_dump(raw))
    result = evaluate_checkpoint(make_cfg(corpus), str(old), split=None, output=str(tmp_path / "m.json"))
    assert result["selection_split"] == "test" and result["splits"]["avqa"] == "test"
    assert result["held_out"]["avqa"] > 0 and result["held_out"]["vqa"] == 0


def test_safe_eval_counts_the_clips_it_cut(run, corpus, tmp_path):
    """A test clip longer than data.max_audio_seconds is read only as far as the encoder takes: its questions are
    counted in n_truncated_audio and flagged in the predictions (the others are not)."""
    import numpy as np
    import soundfile as sf

    from safe_av.data.formats import read

    root = _damaged_copy(corpus, tmp_path)
    samples = read("musicavqa", root / "musicavqa", "test").samples
    long_clip = samples[0].audio
    rate = sf.info(long_clip).samplerate
    sf.write(long_clip, 0.1 * np.sin(np.arange(12 * rate) * 0.05), rate)  # 12 s > the 10-s limit
    cfg = make_cfg(root)
    cfg.data.caption_dataset = ""
    result = evaluate_checkpoint(cfg, str(run), split=None, output=str(tmp_path / "m.json"))
    n_long = sum(s.audio == long_clip for s in samples)
    assert result["n_truncated_audio"] == {"avqa": n_long} and n_long > 0
    lines = [json.loads(x) for x in Path(result["predictions_file"]).read_text().splitlines()]
    flagged = {r["id"] for r in lines if r["set"] == "avqa" and r["condition"] == "safe" and r["audio_truncated"]}
    assert flagged == {s.id for s in samples if s.audio == long_clip}
    assert not any(r["audio_truncated"] for r in lines if r["set"] == "vqa")  # no audio: never cut


def test_safe_eval_says_which_sets_it_skips_and_why(run, corpus, tmp_path, caplog):
    """A set absent in its split is named on the console with the key its split came from (a typo in
    data.eval_split used to show only in the JSON), and VQA v2's missing test split says why and what to use."""
    import logging

    with caplog.at_level(logging.WARNING, logger="safe_av.eval.run"):
        result = evaluate_checkpoint(make_cfg(corpus), str(run), split="test", output=str(tmp_path / "a.json"))
    assert "VQA v2 publishes no test answers" in result["missing_datasets"]["vqav2"]
    assert "vqav2 is not evaluated (--split='test')" in caplog.text and "drop --split" in caplog.text
    caplog.clear()
    cfg = make_cfg(corpus)
    cfg.data.eval_split = "tset"
    with caplog.at_level(logging.WARNING, logger="safe_av.eval.run"):
        result = evaluate_checkpoint(cfg, str(run), split=None, output=str(tmp_path / "b.json"))
    assert set(result["missing_datasets"]) == {"musicavqa", "audiocaps"} and "safe_vqa_accuracy" in result
    assert "musicavqa is not evaluated (data.eval_split='tset')" in caplog.text


def test_safe_eval_of_a_split_without_answers_skips_the_set_and_counts_its_questions(run, corpus, tmp_path):
    """VQA v2's test questions are public, its answers are not: `--split test` with the questions file present
    leaves VQA out (named in missing_datasets, its questions counted in skipped_annotations) instead of failing in
    score_vqa after both generation passes."""
    root = _damaged_copy(corpus, tmp_path)
    vqa = root / "vqav2"
    questions = json.loads(next(vqa.glob("*val2014_questions.json")).read_text())
    questions["data_subtype"] = "test2015"
    (vqa / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(questions))
    result = evaluate_checkpoint(make_cfg(root), str(run), split="test", output=str(tmp_path / "m.json"))
    n = len(questions["questions"])
    assert "has %d questions but no answers" % n in result["missing_datasets"]["vqav2"]
    assert result["skipped_annotations"]["vqav2"] == {"no answers": n}
    assert "safe_vqa_accuracy" not in result and result["avqa_accuracy"] is not None


def test_user_text_never_becomes_a_placeholder_and_a_long_question_keeps_its_answer_cue(loaded, media):
    """A question naming "<audio>" or "<image>" is text (it gave one placeholder more than there were embeddings);
    a question longer than data.max_text_length is cut, not the template's "Answer:" cue after it."""
    image, audio = media
    proc = loaded.processor
    enc = proc.encode("what is <audio> and <image> here?", None, has_image=True, has_audio=True)
    assert enc.input_ids.count(proc.audio_token_id) == proc.num_audio_tokens
    assert enc.input_ids.count(proc.image_token_id) == proc.num_image_tokens
    assert isinstance(loaded.answer("what is <audio> here?", image=image, audio=audio), str)
    cue = proc._ids(" Answer:") if proc.family != "llava" else proc._ids(" ASSISTANT:")
    short = type(proc)(**{**proc.__dict__, "max_length": 12, "stats": {"truncated": 0}})
    cut = short.encode("why " * 40, None, has_image=False, has_audio=False)
    assert short.stats["truncated"] == 1 and cut.input_ids[-len(cue):] == cue and len(cut.input_ids) <= 12 + 1
    before = dict(loaded.processor.stats)
    loaded.answer("why " * 600, image=image)  # cut once, counted once (the API's length checks do not count)
    assert loaded.processor.stats["truncated"] == before.get("truncated", 0) + 1


def test_inputs_the_api_refuses_with_the_field_named(loaded, media, tmp_path):
    """An empty path (it read the working directory as a frame folder), a prompt that leaves no room for the answer
    in the language model's positions, and SAFEModel.generate's raw inputs checked like the API's."""
    import numpy as np
    from PIL import Image

    image, audio = media
    with pytest.raises(InputError, match=r"input: field 'image' is an empty path"):
        loaded.answer("Which?", image="")
    with pytest.raises(InputError, match=r"input: field 'audio' is an empty path"):
        loaded.answer("Which?", audio="")
    from pathlib import Path

    with pytest.raises(InputError, match=r"input: field 'image' is an empty path"):  # Path("") is Path(".")
        loaded.answer("Which?", image=Path(""))
    limit = loaded.model.base.max_positions
    with pytest.raises(InputError, match=rf"field 'question': the prompt takes \d+ positions .*beyond the language "
                                         rf"model's {limit}"):
        loaded.answer("Which?", image=image, max_new_tokens=limit)
    # the check uses the max_new_tokens the call will use, not the default: a prompt that leaves room for 2 but
    # not for the default is answered with 2
    n = len(loaded.processor.encode("Which?", None, has_image=True, has_audio=False).input_ids)
    tight = type(loaded)(loaded.loaded, max_new_tokens=limit - n + 1)
    with pytest.raises(InputError, match="beyond the language model"):
        tight.answer("Which?", image=image)
    assert isinstance(tight.answer("Which?", image=image, max_new_tokens=2), str)
    with pytest.raises(InputError, match=r"item 1: field 'audio': expected a non-empty finite 1-D waveform"):
        loaded.model.generate([None, None], [None, np.zeros((16000, 2), np.float32)], ["a", "b"],
                              processor=loaded.processor)
    with pytest.raises(ValueError, match="2 images, 1 audio and 2 prompts"):
        loaded.model.generate([None, None], [None], ["a", "b"], processor=loaded.processor)
    # a 16-bit image given as a PIL image is rescaled as the same file is (PIL's convert clipped it to white)
    wide = tmp_path / "wide.png"
    Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)).save(wide)
    from safe_av.api import prepare_item
    as_pil = prepare_item("?", Image.open(wide), sampling_rate=loaded.sampling_rate)["image"]
    as_file = prepare_item("?", wide, sampling_rate=loaded.sampling_rate)["image"]
    assert np.array_equal(np.asarray(as_pil), np.asarray(as_file)) and 100 < np.asarray(as_pil).mean() < 160


def test_eval_and_infer_refuse_an_output_that_is_a_folder_before_any_work(run, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"question": "?"}\n')
    assert cli(["infer", "--checkpoint", str(run), "--input", str(tmp_path / "in.jsonl"),
                "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run),
                "--output", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err and not list(tmp_path.glob("*.predictions.jsonl"))


def test_a_waveform_array_is_answered_as_its_file(loaded, media):
    """An array at the model's rate gets the file's treatment (cut, peak normalised, silence refused), so the answer
    is the same either way; a quieter copy of it too."""
    from safe_av.data.audio import load_audio

    image, audio = media
    clip = load_audio(audio, target_sr=loaded.sampling_rate, max_seconds=loaded.cfg.data.max_audio_seconds)
    raw = clip.waveform[:clip.num_valid]
    by_file = loaded.answer("Which instrument is playing?", image=image, audio=audio)
    assert loaded.answer("Which instrument is playing?", image=image, audio=raw * 0.1) == by_file
    item = loaded.prepare("?", audio=raw * 0.1)
    assert item["num_valid"] == clip.num_valid and abs(float(abs(item["waveform"]).max()) - 1.0) < 1e-6
    with pytest.raises(InputError, match=r"field 'audio': silent clip"):
        loaded.answer("?", audio=raw * 0)
