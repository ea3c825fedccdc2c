"""The tiny base's pretraining as a whole: what its cache key must hold."""

import torch

from safe_av.training import pretrain as pt


def test_base_depends_only_on_its_key(small_pretrain, tmp_path):
    """The base is keyed by its own seed and recipe: another SAFE training seed gets the same weights (so it
    may share the cached base), and image augmentation, which changes the weights, changes the key."""
    from safetensors.torch import load_file

    cfg, train, vocab = small_pretrain
    folder = pt.pretrain_tiny_base(cfg, train, vocab)
    first = folder.rename(tmp_path / "first")  # so that the next call trains again
    cfg.train.seed = 5
    second = pt.pretrain_tiny_base(cfg, train, vocab)
    assert second == folder  # same key
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = tmp_path / "elsewhere"  # the cache folder is not part of the key: a moved cache keeps its bases
    cfg.train.pretrain.cache_dir = str(moved)
    assert pt.pretrained_base_folder(cfg, train, vocab) == moved / folder.name
    cfg.data.augment = False
    assert pt.pretrained_base_folder(cfg, train, vocab).name != folder.name
