"""Typed configuration: every preset loads; errors name the key path and the value."""

from pathlib import Path

import pytest

from safe_av.config import ConfigError, load_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_there_are_presets():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "blip2_opt_clap.yaml", "blip2_flant5_whisper.yaml", "llava_whisper.yaml",
            "llava_clap.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.phases and all(p.lr for p in cfg.train.phases)
    for phase in cfg.train.phases:  # every trained part has a learning rate
        for part in phase.train:
            if part != "fusion" or cfg.model.fusion.enabled:
                assert part in phase.lr, (path.name, phase.name, part)


def test_spec_demo_configuration():
    cfg = load_config("configs/blip2_opt_clap.yaml")
    assert cfg.model.base == "Salesforce/blip2-opt-2.7b"
    assert cfg.train.mixed_precision == "fp16" and cfg.train.optim.grad_accum == 4
    assert all(p.batch_size == 4 for p in cfg.train.phases)


def test_override_from_command_line():
    cfg = load_config("configs/demo.yaml", ["model.fusion.num_heads=2", "train.seed=7", "loss.temperature=2.5"])
    assert cfg.model.fusion.num_heads == 2 and cfg.train.seed == 7 and cfg.loss.temperature == 2.5


@pytest.mark.parametrize("override,needle", [
    ("model.fusion.nm_heads=4", "model.fusion.nm_heads: unknown key"),
    ("model.fusion.num_heads=0", "model.fusion.num_heads=0: must be > 0"),
    ("model.fusion.num_heads=four", "model.fusion.num_heads='four': expected an integer"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8': must be one of"),
    ("data.max_audio_seconds=-1", "data.max_audio_seconds=-1.0: must be > 0"),
    ("train.phases=[{name: x, train: [projecter]}]", "train.phases[0].train='projecter'"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert needle in str(err.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusion:\n    num_head: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "num_head" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_feature_cache_refused_with_audio_augmentation():
    with pytest.raises(ConfigError, match="audio_augment"):
        load_config("configs/demo.yaml", ["data.audio_augment=true", "data.feature_cache=/tmp/x"])
