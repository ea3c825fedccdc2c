"""The tiny audio encoder's pretraining: targets, cache, reload through from_pretrained."""

import json

import numpy as np
import pytest
import torch

from safe_av.config import SAFEConfig
from safe_av.data.synth_scenes import Scene, Voice
from safe_av.models.audio_encoders import AudioEncoder
from safe_av.models.presets import build_tiny_audio, load_audio_encoder
from safe_av.training import pretrain_audio as pa


def test_scene_targets_by_hand():
    scene = Scene(duration=5.0, position={"piano": "left", "drum": "middle", "flute": "right"}, voices={
        "drum": Voice(onset=0.1, starts=[0.1, 0.6, 1.1], gain=0.25),
        "piano": Voice(onset=0.5, starts=[0.5, 2.0], gain=1.0),
    })
    t = pa.scene_targets(scene)  # INSTRUMENTS order: piano, violin, flute, drum
    assert t["loudness"].tolist() == [1, 0, 0, 2]  # rank among the sounding: piano loudest, drum second
    assert t["notes"].tolist() == [2, 0, 0, 3]
    assert t["order"].tolist() == [2, 0, 0, 1]  # drum enters first
    np.testing.assert_allclose(t["span"], [(2.0 + 0.3 - 0.5) / 10, 0, 0, (1.1 + 0.3 - 0.1) / 10], atol=1e-6)


def _cfg(tmp_path) -> SAFEConfig:
    cfg = SAFEConfig()
    cfg.train.pretrain.enabled = True
    cfg.train.pretrain.cache_dir = str(tmp_path / "cache")
    cfg.train.pretrain.audio.enabled = True
    cfg.train.pretrain.audio.clips = 32
    cfg.train.pretrain.audio.epochs = 2
    cfg.train.pretrain.audio.batch_size = 16
    return cfg


def test_pretrains_saves_and_reloads_through_from_pretrained(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert pa.wants_audio_pretraining(cfg)
    folder = pa.pretrain_tiny_audio(cfg)
    assert folder == pa.pretrained_audio_folder(cfg) and (folder / "DONE").is_file()
    report = json.loads((folder / "pretrain.json").read_text())
    assert report["steps"] == 4 and report["clips"] == 32
    assert set(report["held_out"]) == {"loudness", "notes", "order", "span_rmse_s"}
    assert all(0.0 <= report["held_out"][k] <= 1.0 for k in ("loudness", "notes", "order"))

    model, fe = load_audio_encoder(str(folder))  # the real checkpoint path
    random_model, _ = build_tiny_audio("tiny-clap", seed=cfg.model.tiny_seed + 1)
    trained = AudioEncoder(model, fe)
    random = AudioEncoder(random_model, fe)
    # training changed the audio tower, and the feature cache key sees it (same config, other weights)
    diff = max((a - b).abs().max().item() for a, b in zip(trained.encoder.parameters(), random.encoder.parameters()))
    assert diff > 1e-4
    assert trained.config_fingerprint()["weights"] != random.config_fingerprint()["weights"]
    reloaded = AudioEncoder(*load_audio_encoder(str(folder)))
    assert reloaded.config_fingerprint() == trained.config_fingerprint()  # deterministic digest
    assert not any(p.requires_grad for p in trained.parameters())

    # cached: a second call trains nothing
    monkeypatch.setattr(pa, "synth_clips", lambda *a, **k: pytest.fail("retrained a cached encoder"))
    assert pa.pretrain_tiny_audio(cfg) == folder


def test_switches_and_key(tmp_path):
    cfg = _cfg(tmp_path)
    key = pa.pretrained_audio_folder(cfg)
    cfg.train.pretrain.audio.epochs = 3
    assert pa.pretrained_audio_folder(cfg) != key  # the recipe is in the key
    cfg.train.pretrain.enabled = False  # the tiny models' master switch
    assert not pa.wants_audio_pretraining(cfg)
    cfg.train.pretrain.enabled = True
    cfg.model.audio_encoder = str(tmp_path)  # a real checkpoint is never pretrained
    assert not pa.wants_audio_pretraining(cfg)


def test_synth_clips_match_the_encoder_inputs_of_corpus_files():
    model, fe = build_tiny_audio("tiny-clap")
    enc = AudioEncoder(model, fe)
    clips = pa.synth_clips(enc, 3, np.random.default_rng(0), max_seconds=10.0)
    assert clips["audio"].shape[0] == 3 and clips["loudness"].shape == (3, 4)
    assert torch.all((clips["audio_valid_frac"] > 0) & (clips["audio_valid_frac"] <= 1))
    assert torch.all((clips["loudness"] > 0).sum(1) >= 1)  # every scene has a sounding instrument


def test_concurrent_runs_build_a_cached_encoder_once(tmp_path, monkeypatch):
    """Two runs asking for the same pretrained encoder at once: one builds it, the other waits and reuses it."""
    import threading
    import time

    cfg = _cfg(tmp_path)
    calls = []
    real = pa._build_tiny_audio

    def slow_build(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # the other run arrives while this one builds
        return real(*a, **k)

    monkeypatch.setattr(pa, "_build_tiny_audio", slow_build)
    out = []
    threads = [threading.Thread(target=lambda: out.append(pa.pretrain_tiny_audio(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 2 and out[0] == out[1] and (out[0] / "DONE").is_file()
