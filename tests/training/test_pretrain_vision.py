"""The tiny base's vision-tower pretraining: targets, frames, training, freezing, cache key."""

import json

import numpy as np
import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from safe_av.config import VisionPretrainConfig
from safe_av.data.synth_scenes import COLOR_OF, SHAPE_OF
from safe_av.data.synthetic import VQA_COLORS
from safe_av.models.base_vl import BaseVL
from safe_av.models.presets import build_tiny_base
from safe_av.training import pretrain as pt
from safe_av.training import pretrain_vision as pv


def test_frame_targets_by_hand():
    objects = [("triangle", VQA_COLORS["yellow"], "right"), (SHAPE_OF["drum"], COLOR_OF["drum"], "left")]
    t = pv.frame_targets(objects)  # slots: left, middle, right
    assert t[0].tolist() == [pv.SHAPES.index("diamond"), 0, pv.SHAPES.index("triangle")]
    assert t[1].tolist() == [pv.COLORS.index("yellow"), 0, pv.COLORS.index("yellow")]


@pytest.mark.parametrize("base", ["tiny-blip2-opt", "tiny-llava"])
def test_frames_and_training_change_only_the_vision_tower(base):
    model, processor = build_tiny_base(base)
    x, y = pv.synth_frames(processor.image_processor, 6, np.random.default_rng(0))
    assert x.shape[:2] == (6, 3) and y.shape == (6, 2, 3)
    assert torch.equal(y[:, 0] == 0, y[:, 1] == 0)  # a slot has a shape exactly when it has a colour
    assert bool(((y[:, 0] > 0).sum(1) >= 1).all())  # every frame shows something

    tower = BaseVL(model, processor).vision_tower
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = pv.pretrain_vision_tower(tower, processor.image_processor,
                                      VisionPretrainConfig(enabled=True, images=64, epochs=2, batch_size=32))
    assert report["steps"] == 4 and report["images"] == 64
    assert set(report["held_out"]) == {"shape", "color"} and all(0 <= v <= 1 for v in report["held_out"].values())
    tower_ids = {id(p) for p in tower.parameters()}
    tower_names = {n for n, p in model.named_parameters() if id(p) in tower_ids}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= tower_names  # nothing outside the tower moved


def test_base_pretraining_keeps_the_pretrained_tower_frozen(small_pretrain, monkeypatch):
    cfg, train, vocab = small_pretrain
    pre = cfg.train.pretrain
    plain = pt.pretrained_base_folder(cfg, train, vocab)
    pre.vision.enabled, pre.vision.images, pre.vision.epochs, pre.vision.batch_size = True, 64, 1, 32
    assert pt.pretrained_base_folder(cfg, train, vocab) != plain  # the vision recipe is in the key

    after_vision = {}
    real = pt.pretrain_vision_tower

    def spy(tower, *a, **k):
        out = real(tower, *a, **k)
        after_vision.update({f"vision_model.{n}": p.detach().clone() for n, p in tower.named_parameters()})
        return out

    monkeypatch.setattr(pt, "pretrain_vision_tower", spy)
    folder = pt.pretrain_tiny_base(cfg, train, vocab)
    report = json.loads((folder / "pretrain.json").read_text())
    assert report["vision"]["images"] == 64 and report["vision"]["frozen_after"] is True
    params = dict(Blip2ForConditionalGeneration.from_pretrained(folder).named_parameters())  # the real loader
    tower = {n for n in params if n.startswith("vision_model.")}
    assert tower and all(torch.equal(params[n], after_vision[n]) for n in tower)  # frozen while VQA trained
    initial = dict(build_tiny_base("tiny-blip2-opt", pt.corpus_texts(vocab), seed=cfg.model.tiny_seed)[0]
                   .named_parameters())  # the random base pretraining starts from (seeded)
    assert not any(torch.equal(initial[n], after_vision[n]) for n in tower)  # the vision stage ran
    assert any(not torch.equal(params[n], initial[n]) for n in params if n.startswith("qformer."))  # VQA trained
