"""`safe fisher` end to end on the small corpus."""

import pytest
from safetensors.torch import load_file

from safe_av.cli import main as cli
from safe_av.config import save_config
from tests.integration.conftest import tiny_train_config


@pytest.fixture
def cfg_file(small_corpus, tmp_path):
    cfg = tiny_train_config(small_corpus, tmp_path, **{"train.pretrain.enabled": "false",
                                                       "data.feature_cache": f"{tmp_path}/features"})
    save_config(cfg, tmp_path / "cfg.yaml")
    return tmp_path / "cfg.yaml"


def test_safe_fisher_writes_the_file_and_no_run_folder(cfg_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stray relative run folder would land here
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "f" / "fisher.safetensors"
    assert cli(["fisher", "--config", str(cfg_file), "--output", str(out)]) == 0
    fisher = load_file(str(out))
    # phase 3 unfreezes language_projection: the Fisher diagonal of its weight and bias (non-negative, not all
    # zero) and the anchor values the penalty pulls them back to
    names = [f"{kind}.base.model.language_projection.{p}" for kind in ("anchor", "fisher") for p in ("bias", "weight")]
    assert sorted(fisher) == names
    diag = [fisher[n] for n in names if n.startswith("fisher.")]
    assert all(bool((t >= 0).all()) and bool(t.any()) for t in diag)
    assert {p.name for p in tmp_path.iterdir()} - before == {"f", "features"}  # the file and the config's cache
    assert f"wrote {out}" in capsys.readouterr().out
    kept = tmp_path / "setup"
    assert cli(["fisher", "--config", str(cfg_file), "--output", str(out), "--output-dir", str(kept)]) == 0
    assert (kept / "config.yaml").is_file()


def test_safe_fisher_without_an_unfrozen_module_is_a_usage_error(small_corpus, tmp_path, capsys):
    cfg = tiny_train_config(small_corpus, tmp_path, **{"train.pretrain.enabled": "false"})
    cfg.train.phases = cfg.train.phases[:2]
    save_config(cfg, tmp_path / "cfg.yaml")
    assert cli(["fisher", "--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path / "f.st")]) == 2
    assert "nothing for the Fisher penalty to protect" in capsys.readouterr().err
