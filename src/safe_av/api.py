"""The Python API: load a trained SAFE model and ask it questions.

```python
from safe_av import api
model = api.load("runs/demo")            # a run folder, its adapter/ folder or a checkpoint folder
print(model.answer("Which instrument is playing?", image="x.jpg", audio="y.wav"))
```

Either medium is optional: without audio the answer is the base VL model's own (SAFE adds nothing
to a sample without audio). ``answer_batch`` takes ``[{"question": ..., "image": ..., "audio": ...}]``.
Bad inputs raise :class:`safe_av.eval.run.InputError` naming the item and the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from safe_av.data.records import DataError
from safe_av.data.text import move_batch
from safe_av.eval.run import InputError, LoadedCheckpoint, load_checkpoint


class SAFE:
    """A loaded SAFE model: ``answer(...)`` and ``answer_batch(...)``.

    Attributes:
        model: the :class:`~safe_av.models.safe_model.SAFEModel` (eval mode).
        processor: its :class:`~safe_av.data.text.SAFEProcessor`.
        cfg: the run's config.
        max_new_tokens: default answer length limit.
        batch_size: ``answer_batch``'s default batch size.
    """

    def __init__(self, loaded: LoadedCheckpoint, *, max_new_tokens: int = 16, batch_size: int = 8):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.cfg = loaded.cfg
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @property
    def sampling_rate(self) -> int:
        """The rate raw waveforms given as arrays must have."""
        return self.processor.sampling_rate

    def prepare(self, question: str, image=None, audio=None, *, where: str = "input") -> dict:
        """Load one request into a collate item; :class:`InputError` names ``where`` and the field.

        Args:
            question: the question (``""`` asks for an audio caption).
            image: an image path, a frame folder, a PIL image, or None.
            audio: an audio path, a 1-D float waveform at :attr:`sampling_rate`, or None.
        """
        from PIL import Image

        from safe_av.data.audio import load_audio
        from safe_av.data.vision import load_image

        if not isinstance(question, str):
            raise InputError(f"{where}: field 'question' must be a string, got {type(question).__name__}")
        item = {"question": question, "answer": None, "image": None, "meta": {}}
        if image is not None:
            if isinstance(image, Image.Image):
                item["image"] = image.convert("RGB")
            elif isinstance(image, (str, Path)):
                try:
                    item["image"] = load_image(image)
                except DataError as err:
                    raise InputError(f"{where}: field 'image': {err}") from err
            else:
                raise InputError(f"{where}: field 'image' must be a path or a PIL image, got {type(image).__name__}")
        if audio is not None:
            if isinstance(audio, (str, Path)):
                try:
                    clip = load_audio(audio, target_sr=self.sampling_rate, max_seconds=self.cfg.data.max_audio_seconds)
                except DataError as err:
                    raise InputError(f"{where}: field 'audio': {err}") from err
                item["waveform"], item["num_valid"] = clip.waveform, clip.num_valid
            else:
                wave = np.asarray(audio, dtype=np.float32)
                if wave.ndim != 1 or wave.size == 0 or not np.isfinite(wave).all():
                    raise InputError(f"{where}: field 'audio': expected a non-empty finite 1-D waveform at "
                                     f"{self.sampling_rate} Hz, got shape {wave.shape}")
                item["waveform"], item["num_valid"] = wave, len(wave)
        return item

    @torch.no_grad()
    def generate_items(self, items: list[dict], *, max_new_tokens: int | None = None) -> list[str]:
        """Answers for items made by :meth:`prepare` (one batch)."""
        if not items:
            return []
        batch = move_batch(self.processor.collate(items), self.model.device)
        return self.model.generate_from_batch(batch, max_new_tokens=max_new_tokens or self.max_new_tokens)

    def answer(self, question: str, image=None, audio=None, *, max_new_tokens: int | None = None) -> str:
        """The model's answer to ``question`` about ``image`` and/or ``audio`` (paths, PIL image, waveform)."""
        return self.generate_items([self.prepare(question, image, audio)], max_new_tokens=max_new_tokens)[0]

    def answer_batch(self, requests: list[dict], *, batch_size: int | None = None,
                     max_new_tokens: int | None = None) -> list[str]:
        """Answers for ``[{"question": ..., "image": ..., "audio": ...}, ...]`` in order.

        Raises:
            InputError: an item is not a dict, lacks ``question``, or a file cannot be loaded (named by index).
        """
        items = []
        for i, req in enumerate(requests):
            where = f"requests[{i}]"
            if not isinstance(req, dict):
                raise InputError(f"{where}: expected a dict with 'question', got {type(req).__name__}")
            if "question" not in req:
                raise InputError(f"{where}: field 'question' is missing")
            unknown = set(req) - {"question", "image", "audio"}
            if unknown:
                raise InputError(f"{where}: unknown field(s) {sorted(unknown)} (known: question, image, audio)")
            items.append(self.prepare(req["question"], req.get("image"), req.get("audio"), where=where))
        size = batch_size or self.batch_size
        out: list[str] = []
        for start in range(0, len(items), size):
            out.extend(self.generate_items(items[start:start + size], max_new_tokens=max_new_tokens))
        return out

    def __repr__(self) -> str:
        f = self.loaded.files
        return f"SAFE({f.kind}={str(f.weights)!r}, base={self.loaded.base_path or self.cfg.model.base!r})"


def load(path: str | Path, *, config=None, device: str | torch.device | None = None, max_new_tokens: int = 16,
         batch_size: int = 8) -> SAFE:
    """Load a trained SAFE model for inference.

    Args:
        path: a run folder (``RUN/``), an adapter folder (``RUN/adapter``) or a training checkpoint
            (``RUN/checkpoints/step-XXXXXXX``). The model is rebuilt from the run's ``config.yaml``.
        config: a :class:`~safe_av.config.SAFEConfig` to use when the folder has no run config beside it.
        device: where to run (default: CUDA if available, else CPU).
        max_new_tokens: default answer length limit.
        batch_size: ``answer_batch``'s default batch size.
    """
    return SAFE(load_checkpoint(path, config, device=device), max_new_tokens=max_new_tokens, batch_size=batch_size)


__all__ = ["load", "SAFE", "InputError"]
