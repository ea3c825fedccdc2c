"""Give a *tiny* base's random vision tower real sight first, before the base learns VQA.

Real BLIP-2 and LLaVA start from a vision encoder pretrained on large image corpora (EVA-CLIP, CLIP) and
keep it frozen while the Q-Former / projector and the language model learn to use it. The tiny base is
built from a config with random weights; trained end to end on a few hundred synthetic VQA questions, its
vision tower learns almost nothing, and the "VL ability" SAFE must keep was mostly answer priors (top-answer
VQA accuracy 0.50; it answered every "What color is the <shape>?" with one of two colours).

So, like the tiny audio encoder (:mod:`safe_av.training.pretrain_audio`), the tiny vision tower is first
trained, supervised, on frames *of its own*: fresh synthetic images (another seed, disjoint from SAFE's
data), drawn exactly as the corpus draws them (``draw_objects`` -> JPEG -> the model's image processor),
half VQA-style shapes and half instrument scenes, with the spec's crop and colour-jitter augmentation.
Targets per slot (left / middle / right): the shape there (or none) and its colour (or none). A linear head
reads the tower's pooled output and is dropped afterwards. The base pretraining then keeps the tower frozen
(``train.pretrain.vision.freeze``), as BLIP-2 and LLaVA do. Held-out accuracies go to the base's
``pretrain.json``.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from safe_av.config import VisionPretrainConfig
from safe_av.data.synth_scenes import COLOR_OF, POSITIONS, SHAPE_OF, draw_objects, make_scene
from safe_av.data.synthetic import VQA_COLORS, VQA_SHAPES
from safe_av.data.vision import color_jitter, random_resized_crop
from safe_av.training.supervised import epoch_batches, fit

log = logging.getLogger(__name__)

SHAPES = ("none", "circle", "square", "triangle", "diamond")
COLORS = ("none", *VQA_COLORS)
"""Per-slot classes: instrument frames use the same shapes and colours as the VQA images (drum: diamond)."""
_COLOR_NAME = {rgb: name for name, rgb in VQA_COLORS.items()}


def frame_targets(objects: list[tuple[str, tuple, str]]) -> np.ndarray:
    """(2, 3) int64: shape and colour class per slot (POSITIONS order) of ``(shape, rgb, slot)`` objects."""
    out = np.zeros((2, len(POSITIONS)), np.int64)
    for shape, rgb, slot in objects:
        out[0, POSITIONS.index(slot)] = SHAPES.index(shape)
        out[1, POSITIONS.index(slot)] = COLORS.index(_COLOR_NAME[tuple(rgb)])
    return out


def _objects(rng: np.random.Generator) -> list[tuple[str, tuple, str]]:
    if rng.random() < 0.5:  # a VQA-style image: 1-3 shapes, any colour
        n = int(rng.integers(1, len(POSITIONS) + 1))
        slots = rng.choice(len(POSITIONS), n, replace=False)
        colors = list(VQA_COLORS.values())
        return [(VQA_SHAPES[int(rng.integers(len(VQA_SHAPES)))], colors[int(rng.integers(len(colors)))], POSITIONS[s])
                for s in slots]
    scene = make_scene(rng)  # an instrument frame
    return [(SHAPE_OF[n], COLOR_OF[n], scene.position[n]) for n in scene.visible]


def synth_frames(image_processor, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh frames as (N, 3, H, W) model inputs + (N, 2, 3) targets. No flips: they would move slots."""
    images, targets = [], []
    for _ in range(n):
        objects = _objects(rng)
        img = Image.open(io.BytesIO(draw_objects(objects, rng))).convert("RGB")
        images.append(color_jitter(random_resized_crop(img, rng, (0.8, 1.0)), rng, 0.2))
        targets.append(frame_targets(objects))
    pixels = image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, torch.from_numpy(np.stack(targets))


class SlotHeads(nn.Module):
    """Linear read-out of the pooled vision output: shape and colour logits per slot; dropped afterwards."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, len(POSITIONS) * (len(SHAPES) + len(COLORS)))

    def forward(self, pooled: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.linear(pooled).view(len(pooled), len(POSITIONS), len(SHAPES) + len(COLORS))
        loss, acc = pooled.new_zeros(()), {}
        for k, (name, lo, hi) in enumerate((("shape", 0, len(SHAPES)), ("color", len(SHAPES), None))):
            part = logits[..., lo:hi]
            loss = loss + nn.functional.cross_entropy(part.reshape(-1, part.shape[-1]), targets[:, k].reshape(-1))
            acc[name] = float((part.argmax(-1) == targets[:, k]).float().mean())
        return loss, acc


def pretrain_vision_tower(tower: nn.Module, image_processor, pre: VisionPretrainConfig, *,
                          device: torch.device | str = "cpu") -> dict:
    """Train a vision tower (``BaseVL.vision_tower``: its forward returns ``pooler_output``) in place on fresh
    synthetic frames; returns the report for pretrain.json."""
    t0 = time.time()
    rng = np.random.default_rng(pre.seed)
    train_x, train_y = synth_frames(image_processor, pre.images, rng)
    held_x, held_y = synth_frames(image_processor, max(pre.batch_size, pre.images // 5), rng)
    log.info("pretrain vision: %d + %d synthetic frames drawn in %.0fs", pre.images, len(held_x), time.time() - t0)
    heads = SlotHeads(tower.config.hidden_size).to(device)
    tower.requires_grad_(True)

    def run(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return heads(tower(pixel_values=x.to(device)).pooler_output, y.to(device))

    tower.train()
    batches, steps = epoch_batches(pre.images, pre.batch_size, pre.epochs, pre.seed)
    loss = fit([*tower.parameters(), *heads.parameters()], pre.lr, batches, steps,
               lambda idx: run(train_x[idx], train_y[idx])[0], what="vision")
    tower.eval()
    with torch.no_grad():
        held_loss, held_acc = run(held_x, held_y)
    log.info("pretrain vision: held-out per-slot accuracy %s", {k: round(v, 3) for k, v in held_acc.items()})
    majority = {name: float(torch.bincount(held_y[:, k].reshape(-1)).max() / held_y[:, k].numel())
                for k, name in enumerate(("shape", "color"))}
    return {"steps": steps, "final_loss": loss, "held_out_loss": float(held_loss),
            "held_out": {k: round(v, 4) for k, v in held_acc.items()},
            "held_out_majority": {k: round(v, 4) for k, v in majority.items()}, "images": pre.images,
            "held_out_images": len(held_x), "frozen_after": pre.freeze, "seconds": round(time.time() - t0, 1)}
