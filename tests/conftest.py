"""Shared fixtures: tiny models built once per session, small deterministic inputs. Never online."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(2)


def tiny_model_config(base: str, audio: str = "tiny-clap"):
    from safe_av.config import ModelConfig

    cfg = ModelConfig(base=base, audio_encoder=audio, num_audio_tokens=4)
    cfg.projector.hidden_dim = 64
    return cfg


@pytest.fixture(scope="session")
def tiny_models():
    """name -> a fresh-built SAFEModel factory's ingredients, cached per (base, audio)."""
    from safe_av.models.build import build_audio_encoder, build_base

    cache = {}

    def get(base: str, audio: str = "tiny-clap"):
        key = (base, audio)
        if key not in cache:
            cfg = tiny_model_config(base, audio)
            cache[key] = (cfg, build_base(cfg), build_audio_encoder(cfg))
        return cache[key]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_image(rng, size=(40, 48)):
    return Image.fromarray((rng.random((size[0], size[1], 3)) * 255).astype("uint8"))


def random_wave(rng, sr, seconds):
    return (0.1 * rng.standard_normal(int(sr * seconds))).astype("float32")
