"""Shared set-up of the tiny base pretraining tests."""

import pytest

from safe_av.config import SAFEConfig


@pytest.fixture
def small_pretrain(tmp_path):
    """A config pretraining the tiny base for one epoch on the small synthetic corpus (vision and sound
    descriptions off), with its training samples and vocabulary."""
    from safe_av.data.synthetic import write_synthetic
    from safe_av.eval.run import pretrain_inputs

    root = tmp_path / "corpus"
    write_synthetic(root, seed=0, small=True)
    cfg = SAFEConfig()
    cfg.data.root, cfg.data.synthetic = str(root), False
    pre = cfg.train.pretrain
    pre.enabled, pre.epochs, pre.batch_size, pre.cache_dir = True, 1, 8, str(tmp_path / "cache")
    train, vocab = pretrain_inputs(cfg)
    return cfg, train, vocab
