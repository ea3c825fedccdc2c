"""Architecture files of the real checkpoints SAFE supports, shipped with the package.

Each ``<name>.json`` is the transformers config dict (``config.to_dict()``) of one public checkpoint,
plus a ``_source`` key saying where the values come from. They hold no weights: ``safe info`` builds
the models from them on the meta device to count parameters and predict memory without any download.

    from safe_av.presets import load_arch
    cfg = load_arch("blip2-opt-2.7b")          # a transformers Blip2Config
"""

from __future__ import annotations

import json
from importlib import resources

#: arch name -> hub checkpoint it describes.
ARCHES: dict[str, str] = {
    "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "blip2-flan-t5-xl": "Salesforce/blip2-flan-t5-xl",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "clap-htsat-unfused": "laion/clap-htsat-unfused",
    "whisper-large-v3": "openai/whisper-large-v3",
}

#: hub name -> arch name (so ``model.base: Salesforce/blip2-opt-2.7b`` finds its file without ``model.arch``).
ARCH_BY_HUB_NAME: dict[str, str] = {hub: name for name, hub in ARCHES.items()}


def available_arches() -> list[str]:
    """Names of the shipped architecture files."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def arch_dict(name: str) -> dict:
    """The stored dict of ``name`` (with its ``_source`` and ``_notes`` keys)."""
    name = ARCH_BY_HUB_NAME.get(name, name)
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"model.arch={name!r}: no architecture file (known: {', '.join(available_arches())})")
    return json.loads(path.read_text())


def load_arch(name: str):
    """A transformers ``PretrainedConfig`` (Blip2Config, LlavaConfig, ClapConfig or WhisperConfig) built
    from the shipped file ``name`` (an arch name or the hub name it describes). Never touches the network."""
    from transformers import CONFIG_MAPPING

    data = {k: v for k, v in arch_dict(name).items() if not k.startswith("_") or k == "_name_or_path"}
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model.arch={name!r}: model_type {model_type!r} is unknown to transformers")
    return CONFIG_MAPPING[model_type].from_dict(data)


__all__ = ["ARCHES", "ARCH_BY_HUB_NAME", "arch_dict", "available_arches", "load_arch"]
