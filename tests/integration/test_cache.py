"""Frozen-feature cache: an epoch without the encoder, features equal to on-line ones, invalidation."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from safe_av.data.audio import SILENT_REASON
from safe_av.data.cache import FeatureCache
from safe_av.data.records import DataError, Sample
from safe_av.data.text import SAFEProcessor
from safe_av.models.safe_model import SAFEModel
from safe_av.training.data import BatchStream, SAFEDataset


@pytest.fixture
def clips(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, seconds in enumerate([0.5, 1.0, 2.5, 1.5]):
        p = tmp_path / f"clip{i}.wav"
        sf.write(p, (0.3 * rng.standard_normal(int(8000 * seconds))).astype("float32"), 8000)
        paths.append(str(p))
    return paths


def _model(tiny_models, k=4):
    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    torch.manual_seed(0)
    return SAFEModel(vl, enc, num_audio_tokens=k, projector_hidden=32).eval()


def test_cached_features_equal_online_and_epoch_skips_encoder(tiny_models, clips, tmp_path, monkeypatch):
    model = _model(tiny_models)
    cache = FeatureCache.open(tmp_path / "cache", model)
    stats = cache.build(model, clips, batch_size=1)
    assert stats["new"] == 4
    proc = SAFEProcessor.from_model(model)
    online = SAFEDataset([Sample(f"s{i}", "audiocaps", "", ["a sound"], audio=p) for i, p in enumerate(clips)],
                         sampling_rate=proc.sampling_rate)
    for i, p in enumerate(clips):  # the same clip through the on-line path, batch of one
        item = online[i]
        feats = model.audio_encoder.prepare([item["waveform"]], [item["num_valid"]])
        with torch.no_grad():
            ref = model.encode_audio(feats["audio"], feats["audio_valid_frac"])[0]
        assert torch.equal(cache.get(p), ref)

    # an epoch over cached features never calls the audio encoder
    def boom(*a, **k):
        raise AssertionError("the audio encoder ran although features are cached")

    monkeypatch.setattr(model.audio_encoder, "forward", boom)
    samples = [Sample(f"s{i}", "audiocaps", "", ["a sound"], audio=p) for i, p in enumerate(clips)]
    dataset = SAFEDataset(samples, sampling_rate=proc.sampling_rate, feature_cache=FeatureCache.open(tmp_path / "cache", model))
    stream = BatchStream(dataset, proc.collate, batch_size=2, dataset_weights=None, seed=0)
    stream.configure(1.0, None)
    for _ in range(stream.batches_per_epoch()):
        batch = stream.next()
        assert batch["audio_features"] is not None and batch["audio"] is None
        with torch.no_grad():
            assert torch.isfinite(model(**batch).loss)


def test_a_damaged_cache_is_an_error_naming_its_file(tiny_models, clips, tmp_path):
    """A shard deleted or cut short, or an index that is not JSON: an error naming the cache's file and how to
    rebuild, never a bare SafetensorError in a loader worker or a skip of every sample behind it."""
    from safe_av.data.cache import CacheError

    model = _model(tiny_models)
    FeatureCache.open(tmp_path / "cache", model).build(model, clips, batch_size=2)
    cache = FeatureCache.open(tmp_path / "cache", model)
    shard = cache.dir / cache.index[cache.key(clips[0])][0]
    shard.write_bytes(shard.read_bytes()[:5])  # cut short
    with pytest.raises(CacheError, match=rf"{shard.name}: cannot read tensor .*clip0.wav.*delete .*safe data cache"):
        cache.get(clips[0])
    samples = [Sample("s0", "audiocaps", "", ["a sound"], audio=clips[0])]
    dataset = SAFEDataset(samples, sampling_rate=48000, feature_cache=FeatureCache.open(tmp_path / "cache", model))
    with pytest.raises(RuntimeError, match=r"loading sample audiocaps/s0 .*clip0.wav.*CacheError.*damaged"):
        dataset[0]
    shard.unlink()
    with pytest.raises(CacheError, match=rf"{shard.name}: cannot read tensor"):
        FeatureCache.open(tmp_path / "cache", model).get(clips[0])
    (cache.dir / "index.json").write_text('{"abc": [')
    with pytest.raises(CacheError, match=r"index.json: unreadable .*the feature cache is damaged; delete"):
        FeatureCache.open(tmp_path / "cache", model)


def test_changed_config_or_content_invalidates(tiny_models, clips, tmp_path):
    model = _model(tiny_models, k=4)
    cache = FeatureCache.open(tmp_path / "cache", model)
    cache.build(model, clips[:2])
    assert clips[0] in cache
    other = FeatureCache.open(tmp_path / "cache", _model(tiny_models, k=2))  # another pooling: another namespace
    assert other.dir != cache.dir and clips[0] not in other
    sf.write(clips[0], np.zeros(8000, dtype="float32") + 0.1, 8000)  # new content: a new key
    fresh = FeatureCache.open(tmp_path / "cache", model)
    assert clips[0] not in fresh and clips[1] in fresh
    with pytest.raises(KeyError, match="safe data cache"):
        fresh.get(clips[0])


def test_bad_file_is_skipped_and_counted(tiny_models, clips, tmp_path):
    model = _model(tiny_models)
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    gone = str(tmp_path / "gone.wav")
    stats = FeatureCache.open(tmp_path / "cache", model).build(model, clips[:1] + [str(bad), gone])
    assert stats == {"cached_before": 0, "new": 1, "skipped": 1, "missing": 1, "known_bad": 0, "truncated": 0}
    # the reason is kept: a later run that meets the file skips it for what is wrong with it, not as "not cached"
    cache = FeatureCache.open(tmp_path / "cache", model)
    with pytest.raises(DataError, match=r"corrupt.wav: field 'audio'.*(unreadable|corrupt)"):
        cache.get(str(bad))
    stats = cache.build(model, clips[:1] + [str(bad)])  # not tried again
    assert stats == {"cached_before": 1, "new": 0, "skipped": 0, "missing": 0, "known_bad": 1, "truncated": 0}


def test_a_skipped_sample_warns_once_per_process_and_is_counted_every_time(tiny_models, clips, tmp_path, caplog):
    """Evaluation reads each sample under several conditions: its skip is logged once at WARNING (later ones at
    DEBUG), while every skip is still returned as None for the collate to count."""
    model = _model(tiny_models)
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    cache = FeatureCache.open(tmp_path / "cache", model)
    cache.build(model, [clips[0], str(bad)])
    samples = [Sample(id="warn-once-1", dataset="audiocaps", question="", answers=["a"], audio=str(bad)),
               Sample(id="warn-once-2", dataset="audiocaps", question="", answers=["b"], audio=clips[0])]
    ds = SAFEDataset(samples, sampling_rate=model.audio_encoder.sampling_rate, feature_cache=cache)
    with caplog.at_level("DEBUG", logger="safe_av.training.data"):
        got = [ds[0], ds[0], ds[1], ds[0]]
    assert got[0] is None and got[1] is None and got[3] is None and got[2] is not None
    records = [r for r in caplog.records if "warn-once-1" in r.getMessage()]
    assert [r.levelname for r in records] == ["WARNING", "DEBUG", "DEBUG"]
    assert "corrupt.wav" in records[0].getMessage()  # the file's own problem, not "not in the feature cache"


def test_safe_data_cache_command_fills_the_cache_and_leaves_nothing_else(small_corpus, tmp_path, capsys):
    """`safe data cache` encodes every split's audio once into --out: one fingerprint folder, no run folder of
    the model it built for it; a second call finds everything cached."""
    from safe_av.cli import main as cli
    from safe_av.config import save_config
    from tests.integration.conftest import tiny_train_config

    cfg = tiny_train_config(small_corpus, tmp_path, **{"train.pretrain.enabled": "false"})
    save_config(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "features"
    assert cli(["data", "cache", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    [namespace] = list(out.iterdir())
    assert {p.name for p in namespace.iterdir()} == {"config.json", "index.json", "truncated.json",
                                                     "shard-00000.safetensors"}
    n = len(json.loads((namespace / "index.json").read_text()))
    assert n > 10 and f"'new': {n}" in first
    assert cli(["data", "cache", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert f"'cached_before': {n}" in second and "'new': 0" in second
    assert len(list(namespace.iterdir())) == 4


def _odd_clips(tmp_path):
    """A directory named like a clip, a silent clip and a 3 s clip (over a 2 s limit)."""
    folder = tmp_path / "dir.wav"
    folder.mkdir()
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(8000, dtype="float32"), 8000)
    long = tmp_path / "long.wav"
    sf.write(long, (0.3 * np.random.default_rng(1).standard_normal(3 * 8000)).astype("float32"), 8000)
    return str(folder), str(silent), str(long)


def test_directory_silent_and_over_long_clips_in_the_cache(tiny_models, clips, tmp_path):
    """A directory is a DataError naming it (counted as missing, never an IsADirectoryError traceback); a silent
    clip is skipped with validate's reason, kept in bad.json; an over-long clip is cached from its start and
    counted as truncated."""
    model = _model(tiny_models)
    folder, silent, long = _odd_clips(tmp_path)
    cache = FeatureCache.open(tmp_path / "cache", model, max_seconds=2.0)
    stats = cache.build(model, [clips[0], folder, silent, long])
    assert stats == {"cached_before": 0, "new": 2, "skipped": 1, "missing": 1, "known_bad": 0, "truncated": 1}
    assert folder not in cache and long in cache and cache.max_seconds == 2.0
    with pytest.raises(DataError, match=r"dir.wav: field 'audio' = '.*dir.wav': is a directory"):
        cache.get(folder)
    reopened = FeatureCache.open(tmp_path / "cache", model, max_seconds=2.0)
    with pytest.raises(DataError) as err:
        reopened.get(silent)
    assert err.value.path == silent and err.value.reason == SILENT_REASON
    assert json.loads((reopened.dir / "bad.json").read_text()) == {reopened.key(silent): SILENT_REASON}


def test_truncated_clips_are_counted_per_batch_and_silent_clips_skipped(tiny_models, clips, tmp_path, caplog,
                                                                       monkeypatch):
    """item["audio_truncated"] -> batch["audio_truncated"] (rows whose clip was cut; 0 when none, in empty batches
    too), the same with the feature cache; a silent clip is a skipped (None) item counted in batch["skipped"]."""
    model = _model(tiny_models)
    proc = SAFEProcessor.from_model(model)
    _, silent, long = _odd_clips(tmp_path)
    samples = [Sample("short", "audiocaps", "", ["a"], audio=clips[0]),
               Sample("long", "audiocaps", "", ["b"], audio=long),
               Sample("trunc-silent", "audiocaps", "", ["c"], audio=silent),
               Sample("text", "vqav2", "q?", ["d"])]
    ds = SAFEDataset(samples, sampling_rate=proc.sampling_rate, max_seconds=2.0)
    import safe_av.data.audio as audio

    monkeypatch.setattr(audio, "_WARNED_CUT", set())  # this process's earlier cuts (other tests) would hide it
    with caplog.at_level("WARNING"):
        items = [ds[i] for i in range(4)]
    assert items[2] is None
    assert [items[i]["audio_truncated"] for i in (0, 1, 3)] == [False, True, False]
    assert any("audiocaps/trunc-silent" in r.getMessage() and SILENT_REASON in r.getMessage() for r in caplog.records)
    cut = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert cut == [f"audio clip cut: {long} lasts 3.00 s; only its first 2 s are used (data.max_audio_seconds)"]
    batch = proc.collate(items)
    assert batch["audio_truncated"] == 1 and batch["skipped"] == 1 and batch["input_ids"].shape[0] == 3
    assert proc.collate([items[0], items[3]])["audio_truncated"] == 0
    assert proc.collate([None, items[2]]) == {"empty": True, "skipped": 2, "audio_truncated": 0}

    cache = FeatureCache.open(tmp_path / "cache", model, max_seconds=2.0)
    cache.build(model, [clips[0], long, silent])
    cached = SAFEDataset(samples, sampling_rate=proc.sampling_rate, max_seconds=2.0, feature_cache=cache)
    items = [cached[i] for i in range(4)]
    assert items[2] is None and [items[i]["audio_truncated"] for i in (0, 1, 3)] == [False, True, False]
    batch = proc.collate(items)
    assert batch["audio_truncated"] == 1 and batch["skipped"] == 1 and batch["audio_features"].shape[0] == 2
    # recorded by the build: a reopened cache knows it without opening the audio file
    reopened = FeatureCache.open(tmp_path / "cache", model, max_seconds=2.0)
    assert reopened.cut_duration(long) == pytest.approx(3.0) and reopened.cut_duration(clips[0]) is None
    again = SAFEDataset(samples, sampling_rate=proc.sampling_rate, max_seconds=2.0, feature_cache=reopened)
    assert [again[i]["audio_truncated"] for i in (0, 1, 3)] == [False, True, False]
    # evaluation's in-memory cache records its cuts the same way
    from safe_av.eval.run import MemoryFeatureCache

    memory = MemoryFeatureCache()
    memory.build(model, [clips[0], long, silent], max_seconds=2.0)
    assert memory.cut_duration(long) == pytest.approx(3.0) and memory.cut_duration(clips[0]) is None
    in_memory = SAFEDataset(samples, sampling_rate=proc.sampling_rate, max_seconds=2.0, feature_cache=memory)
    assert [in_memory[i]["audio_truncated"] for i in (0, 1, 3)] == [False, True, False] and in_memory[2] is None
