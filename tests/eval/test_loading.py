"""Loading checks and API / CLI edges of ``safe eval`` / ``safe infer`` / ``safe_av.api`` on fake runs: strict
checkpoint loading, checkpoint ``meta.json`` (base_path, family), the predictions file's scores, unknown request
fields, argument errors, and when an answer without audio is the base's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safe_av import api
from safe_av.cli import main as cli
from safe_av.config import config_to_yaml, save_config
from safe_av.data.text import move_batch
from safe_av.eval.evaluate import normalize_answer
from safe_av.eval.metrics import vqa_accuracy
from safe_av.eval.run import InputError, OriginalModel, evaluate_checkpoint
from safe_av.models.build import build_base, build_safe_model
from tests.eval.test_run import fake_run, make_cfg, open_gates

QUESTION = "Which instrument is playing?"


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("run") / "run", make_cfg(corpus))


@pytest.fixture(scope="module")
def loaded(run):
    return api.load(run, max_new_tokens=4)


@pytest.fixture(scope="module")
def media(corpus):
    frames = sorted((corpus / "musicavqa" / "frames").iterdir())[0]
    return sorted(frames.glob("*.jpg"))[0], sorted((corpus / "musicavqa" / "audio").glob("*.wav"))[0]


def unfreeze_cfg(corpus):
    """A run whose last phase trains language_projection inside the base."""
    cfg = make_cfg(corpus)
    cfg.train.phases[-1].train = ["projector", "fusion", "base"]
    cfg.train.phases[-1].unfreeze = ["language_projection"]
    cfg.train.phases[-1].lr = {"projector": 1e-4, "fusion": 1e-4, "base": 1e-4}
    return cfg


def perturb_language_projection(model) -> None:
    with torch.no_grad():
        proj = model.base.model.language_projection
        proj.weight.add_(5 * torch.randn_like(proj.weight))
        proj.bias.add_(5 * torch.randn_like(proj.bias))


# ------------------------------------------------------------------ safe eval's predictions file


def test_predictions_file_has_score_and_correct(run, corpus, tmp_path):
    cfg = make_cfg(corpus)
    cfg.data.caption_dataset = ""
    cfg.eval.max_samples = 6
    result = evaluate_checkpoint(cfg, str(run), output=str(tmp_path / "m.json"))
    lines = [json.loads(x) for x in Path(result["predictions_file"]).read_text().splitlines()]
    vqa = [r for r in lines if r["set"] == "vqa"]
    avqa = [r for r in lines if r["set"] == "avqa"]
    assert len(vqa) == 12 and len(avqa) == 24  # 6 samples x (safe, original) and x 4 conditions
    for r in vqa:
        assert r["score"] == vqa_accuracy(r["prediction"], r["answers"]) and "correct" not in r
    for r in avqa:
        assert r["correct"] is (normalize_answer(r["prediction"]) == normalize_answer(r["answers"][0]))
        assert "score" not in r
    safe_vqa = [r["score"] for r in vqa if r["condition"] == "safe"]
    assert sum(safe_vqa) / len(safe_vqa) == pytest.approx(result["safe_vqa_accuracy"])
    for condition, key in (("safe", "avqa_accuracy"), ("audio_removed", "audio_masked_avqa_accuracy"),
                           ("original", "original_avqa_accuracy")):
        correct = [r["correct"] for r in avqa if r["condition"] == condition]
        assert sum(correct) / len(correct) == pytest.approx(result[key])


# ------------------------------------------------------------------ training checkpoints


def test_checkpoint_loads_strictly_but_without_modules_not_unfrozen_yet(corpus, tmp_path, media):
    """A checkpoint written before the phase that unfreezes language_projection has none of its parameters: it
    loads (the base's own weights are right). A truncated one is refused, naming the file and the tensors."""
    image, audio = media
    cfg = unfreeze_cfg(corpus)
    torch.manual_seed(0)
    model = build_safe_model(cfg.model).eval()  # phase 1: nothing of the base in the state yet
    open_gates(model)
    state = model.adapter_state_dict()
    assert not any("language_projection" in k for k in state)

    def checkpoint(name, tensors):
        step = tmp_path / name / "checkpoints" / "step-0000003"
        step.mkdir(parents=True)
        save_file(tensors, str(step / "model.safetensors"))
        save_config(cfg, step / "config.yaml")
        return step

    full = api.load(checkpoint("early", state), max_new_tokens=4)
    assert full.loaded.files.kind == "checkpoint"
    item = full.prepare(QUESTION, image, audio)
    expected = model.generate_from_batch(move_batch(full.processor.collate([item]), "cpu"), max_new_tokens=4)
    assert full.answer(QUESTION, image=image, audio=audio) == expected[0]

    step = checkpoint("truncated", {k: v for k, v in state.items() if k != "fusion.q_proj.weight"})
    with pytest.raises(ValueError) as err:
        api.load(step)
    assert str(err.value).startswith(f"{step / 'model.safetensors'}: 1 adapter tensor(s) missing: "
                                     "['fusion.q_proj.weight']")
    # an unfrozen module is all there or all absent
    later = build_safe_model(cfg.model, unfreeze=["language_projection"]).adapter_state_dict()
    weight = next(k for k in later if k.endswith("language_projection.weight"))
    step = checkpoint("half_module", dict(state, **{weight: later[weight]}))
    with pytest.raises(ValueError, match=r"1 adapter tensor\(s\) missing: "
                                         r"\['base\.model\.language_projection\.bias'\]"):
        api.load(step)


def _checkpoint_run(cfg, folder: Path, base, meta: dict) -> tuple[Path, object]:
    """A run that never finished: a complete checkpoint (save_checkpoint) and no adapter/."""
    from safe_av.training import checkpoint as ckpt

    torch.manual_seed(0)
    model = build_safe_model(cfg.model, base=base).eval()
    open_gates(model)
    optim = torch.optim.AdamW(list(model.trainable_parameters().values()), lr=1e-4)
    ckpt.save_checkpoint(folder, 3, model_state=model.adapter_state_dict(), optimizer=optim, scheduler=None,
                         scaler_state=None, train_state={"global_step": 3}, config_yaml=config_to_yaml(cfg),
                         meta=meta)
    return folder, model


def test_unfinished_run_loads_its_base_from_checkpoint_meta_in_another_directory(corpus, tmp_path, media,
                                                                                  monkeypatch):
    """The base was pretrained into a cache relative to the training directory; from elsewhere the checkpoint's
    meta.json ``base_path`` finds it (as adapter_config.json does for a finished run)."""
    image, audio = media
    cfg = make_cfg(corpus)
    cfg.train.pretrain.enabled = True
    cfg.train.pretrain.cache_dir = "cache"  # relative to the training directory: absent from the other one
    base = build_base(cfg.model)
    with torch.no_grad():  # a base unlike the random tiny preset
        base.model.language_projection.weight.mul_(3.0)
    base_dir = tmp_path / "train_dir" / "cache" / "tiny-blip2-opt-pretrained"
    base.model.save_pretrained(base_dir)
    base.processor.save_pretrained(base_dir)
    run_dir, model = _checkpoint_run(cfg, tmp_path / "train_dir" / "run", base,
                                     {"base_path": str(base_dir.resolve()), **model_identity(cfg, base)})
    meta = json.loads(next((run_dir / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["base_path"] == str(base_dir.resolve()) and meta["step"] == 3
    assert not (run_dir / "adapter").exists()

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    safe = api.load(run_dir, max_new_tokens=4)
    assert safe.loaded.files.kind == "checkpoint" and safe.loaded.base_path == str(base_dir.resolve())
    assert torch.equal(safe.model.base.model.language_projection.weight, base.model.language_projection.weight)
    item = safe.prepare(QUESTION, image, audio)
    expected = model.generate_from_batch(move_batch(safe.processor.collate([item]), "cpu"), max_new_tokens=4)
    assert safe.answer(QUESTION, image=image, audio=audio) == expected[0]


def model_identity(cfg, base) -> dict:
    """What save_pretrained records about the base and audio encoder (the trainer can pass it as checkpoint meta)."""
    return build_safe_model(cfg.model, base=base).adapter_identity()


def test_checkpoint_meta_family_is_checked(corpus, tmp_path):
    cfg = make_cfg(corpus)
    base = build_base(cfg.model)
    identity = dict(model_identity(cfg, base), base_family="llava")
    run_dir, _ = _checkpoint_run(cfg, tmp_path / "run", base, identity)
    step = next((run_dir / "checkpoints").glob("step-*"))
    with pytest.raises(ValueError) as err:
        api.load(run_dir)
    assert str(err.value).startswith(f"{step}: base_family='llava': the adapter was trained with a llava base, "
                                     "but the base given is a blip2-opt one")


# ------------------------------------------------------------------ safe infer --input: unknown fields


def test_infer_jsonl_rejects_unknown_fields_as_the_api_does(run, media, tmp_path, capsys, loaded):
    image, audio = media
    typo = {"img": str(image), "audo": str(audio), "question": QUESTION}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(typo) + "\n" + json.dumps({"image": str(image), "question": QUESTION}) + "\n")
    out = tmp_path / "answers.jsonl"
    rc = cli(["infer", "--checkpoint", str(run), "--input", str(src), "--output", str(out), "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 1
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0] == {"line": 1, "error": f"{src}:1: unknown field(s) ['audo', 'img'] (known: question, image, "
                                              "audio)"}
    assert records[1]["answer"] == loaded.answer(QUESTION, image=image)
    assert "answered 1 of 2 lines, 1 failed" in err
    with pytest.raises(InputError) as api_err:
        loaded.answer_batch([typo])
    assert str(api_err.value) == records[0]["error"].replace(f"{src}:1", "requests[0]")


# ------------------------------------------------------------------ API argument errors


def test_api_load_takes_a_config_path_or_object(run, tmp_path, media, loaded):
    image, audio = media
    lone = tmp_path / "lone" / "adapter"  # no run config beside it
    shutil.copytree(run / "adapter", lone)
    by_path = api.load(lone, config=str(run / "config.yaml"), max_new_tokens=4)
    assert by_path.cfg.data.root == loaded.cfg.data.root
    assert by_path.answer(QUESTION, image=image, audio=audio) == loaded.answer(QUESTION, image=image, audio=audio)
    with pytest.raises(TypeError, match="config: expected a safe_av.config.SAFEConfig or the path .* got int"):
        api.load(lone, config=3)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        api.load(lone, config=tmp_path / "nope.yaml")


def test_api_argument_and_input_errors(run, media, tmp_path, loaded):
    image, audio = media
    with pytest.raises(InputError) as err:
        loaded.answer(QUESTION, audio=b"abc")
    assert str(err.value).startswith("input: field 'audio' must be a path or a 1-D float waveform at 48000 Hz, "
                                     "got bytes")
    with pytest.raises(InputError, match=r"requests\[0\]: field 'audio' must be a path .* got list"):
        loaded.answer_batch([{"question": "?", "audio": ["a", "b"]}])
    missing = tmp_path / "nonexistent.wav"
    with pytest.raises(InputError) as err:
        loaded.answer(QUESTION, audio=str(missing))
    assert str(err.value) == f"input: field 'audio' = '{missing}': file not found"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(InputError) as err:
        loaded.answer(QUESTION, image=corrupt)
    assert str(err.value).startswith(f"input: field 'image' = '{corrupt}': unreadable or corrupt image")
    for kwargs in ({"max_new_tokens": 0}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError, match=f"max_new_tokens={kwargs['max_new_tokens']}: expected an integer >= 1"):
            loaded.answer(QUESTION, image=image, **kwargs)
    with pytest.raises(ValueError, match="batch_size=0: expected an integer >= 1"):
        loaded.answer_batch([{"question": QUESTION}], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        api.load(run, max_new_tokens=0)
    # None means the default: the same as not passing it
    assert loaded.answer(QUESTION, image=image, max_new_tokens=None) == loaded.answer(QUESTION, image=image)
    defaults = api.SAFE(loaded.loaded, max_new_tokens=None, batch_size=None)
    assert (defaults.max_new_tokens, defaults.batch_size) == (16, 8)
    assert len(loaded.answer(QUESTION, image=image, audio=audio, max_new_tokens=1).split()) <= 1


def test_api_load_refuses_an_unavailable_device_clearly(run, capsys):
    bad = "cuda:99" if torch.cuda.is_available() else "cuda"
    reason = "CUDA device" if torch.cuda.is_available() else "CUDA is not available here"
    with pytest.raises(ValueError, match=f"device='{bad}': {reason}"):
        api.load(run, device=bad)
    with pytest.raises(ValueError, match="device='bogus': not a torch device"):
        api.load(run, device="bogus")
    assert cli(["infer", "--checkpoint", str(run), "--question", "?", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0: must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ when is an answer without audio the base's own


def _image_only_answers(safe, corpus) -> tuple[list[str], list[str]]:
    from safe_av.training.data import read_corpus

    vqa = read_corpus(safe.cfg.data, ["vqav2"], "val").samples[:8]
    items = [safe.prepare(s.question, image=s.image) for s in vqa]
    batch = move_batch(safe.processor.collate(items), safe.model.device)
    return (safe.model.generate_from_batch(batch, max_new_tokens=3),
            OriginalModel(safe.model).generate_from_batch(batch, max_new_tokens=3))


def test_answers_without_audio_are_the_bases_own_only_when_nothing_in_the_base_trained(run, corpus, tmp_path,
                                                                                        loaded):
    assert loaded.base_is_original
    safe, original = _image_only_answers(loaded, corpus)
    assert safe == original
    torch.manual_seed(0)
    cfg = unfreeze_cfg(corpus)
    model = build_safe_model(cfg.model, unfreeze=["language_projection"])
    open_gates(model)
    perturb_language_projection(model)
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    model.save_pretrained(tmp_path / "run" / "adapter")
    trained = api.load(tmp_path / "run")
    assert not trained.base_is_original
    safe, original = _image_only_answers(trained, corpus)
    assert safe != original
    # the original model's answers do not depend on what was trained
    assert original == _image_only_answers(loaded, corpus)[1]
