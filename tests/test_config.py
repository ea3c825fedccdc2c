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
    ("data.max_audio_seconds=-1", "data.max_audio_seconds=-1.0: must be in (0, 600]"),
    ("data.max_audio_seconds=1e7", "data.max_audio_seconds=10000000.0: must be in (0, 600] (every clip is padded"),
    ("train.phases=[{name: x, train: [projecter]}]", "train.phases[0].train='projecter'"),
    ("train.phases.7.max_steps=5", "train.phases.7.max_steps: train.phases has 3 entries (indices 0-2), got '7'"),
    ("train.phases.0.max_steps=-5", "train.phases[0].max_steps=-5: must be > 0"),
    ("model.lora.r=0", "model.lora.r=0: must be > 0"),
    ("model.lora.dropout=1.5", "model.lora.dropout=1.5: must be in [0, 1)"),
    ("eval.batch_size=0", "eval.batch_size=0: must be > 0"),
    ("model.fusion={num_heads: 4", "override 'model.fusion={num_heads: 4': the value is not valid YAML"),
    ("model.projector.hidden_dim=1e3", "model.projector.hidden_dim='1e3': expected an integer"),
    ("train.phases.0.datasets={audiocap: 1.0}", "train.phases[0].datasets.audiocap='audiocap': unknown dataset"),
    ("data.vqa_dataset=vqa2", "data.vqa_dataset='vqa2': must be one of"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert needle in str(err.value)


def test_a_bad_override_is_blamed_on_set_not_on_the_file():
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", ["train.seed=abc"])
    assert str(err.value).startswith("--set train.seed='abc': expected an integer")
    with pytest.raises(ConfigError) as err:  # a value set by --set deep in a list is blamed on --set
        load_config("configs/demo.yaml", ["train.phases=[{name: x, train: [projecter]}]", "train.seed=1"])
    assert str(err.value).startswith("--set train.phases[0].train='projecter'")
    for override, start in (("dta.root=x", "--set dta: unknown key; did you mean 'data'?"),
                            ("train.phases.0.max_step=3", "--set train.phases[0].max_step: unknown key; did you "
                                                          "mean 'max_steps'?"),
                            ("train.phases.9.max_steps=3", "--set train.phases.9.max_steps: train.phases has 3")):
        with pytest.raises(ConfigError) as err:
            load_config("configs/demo.yaml", [override])
        assert str(err.value).startswith(start), str(err.value)


def test_a_bad_value_in_the_file_names_the_file_beside_an_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  sede: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.seed=1"])
    assert str(err.value).startswith(f"{path}: train.sede: unknown key; did you mean 'seed'?")
    path.write_text("train:\n  phases:\n    - {name: x, train: [projecter]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.seed=1"])
    assert str(err.value).startswith(f"{path}: train.phases[0].train='projecter'")


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; a float field takes it as the number it means."""
    cfg = load_config("configs/demo.yaml", ["train.pretrain.lr=1e-3", "train.phases.0.lr={projector: 2E-4}"])
    assert cfg.train.pretrain.lr == 1e-3 and cfg.train.phases[0].lr == {"projector": 2e-4}
    f = tmp_path / "exp.yaml"
    f.write_text("loss:\n  temperature: 2e0\n")
    assert load_config(f).loss.temperature == 2.0
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("configs/demo.yaml", ["train.pretrain.lr=1e-3x"])


def test_malformed_yaml_file_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seed: 1\nmodel: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad}: not valid YAML:") and "line 4, column 1" in str(err.value)


def test_dataset_names_are_the_readers_and_captioning_can_be_off():
    from safe_av.config import DATASETS
    from safe_av.data.formats import READERS

    assert set(DATASETS) == set(READERS)
    for off in ("data.caption_dataset=", "data.caption_dataset=null", 'data.caption_dataset=""'):
        assert not load_config("configs/demo.yaml", [off]).data.caption_dataset


def test_repeated_set_flags_all_apply(capsys):
    from safe_av.cli import build_parser

    args = build_parser().parse_args(["info", "--config", "configs/demo.yaml", "--set", "train.seed=3",
                                      "--set", "model.fusion.num_heads=2", "loss.temperature=2.5"])
    assert args.set == ["train.seed=3", "model.fusion.num_heads=2", "loss.temperature=2.5"]


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


def test_a_key_written_twice_is_refused_not_silently_replaced(tmp_path):
    # PyYAML keeps the last: the second `data:` would replace the first section whole (root back to default)
    p = tmp_path / "dup.yaml"
    p.write_text("data:\n  root: small\n  num_workers: 2\ndata:\n  eval_split: train\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: key 'data' appears twice in one mapping "
                                          r"\(first at line 1\) at line 4, column 1"):
        load_config(p)
    with pytest.raises(ConfigError, match="key 'root' appears twice"):
        load_config(None, ["data={root: a, root: b}"])
    p.write_text("data:\n  root: small\n  num_workers: 2\n")
    assert load_config(p).data.num_workers == 2


def test_a_config_that_is_not_utf8_names_file_and_byte(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"data:\n  root: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 17\)"):
        load_config(p)


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    p = tmp_path / "anchors.yaml"
    p.write_text("train:\n  phases:\n    - &p {name: a, train: [projector], lr: {projector: 1.0e-3}, datasets: {audiocaps: 1.0},"
                 " max_steps: 2}\n    - {<<: *p, name: b, max_steps: 5}\n")
    cfg = load_config(p)
    assert [(q.name, q.max_steps, q.lr) for q in cfg.train.phases] == [("a", 2, {"projector": 1e-3}),
                                                                         ("b", 5, {"projector": 1e-3})]
    p.write_text("data:\n  ? [1, 2]\n  : x\n")
    with pytest.raises(ConfigError, match="unhashable key"):
        load_config(p)
