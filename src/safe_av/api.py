"""The Python API: load a trained SAFE model and ask it questions.

```python
from safe_av import api
model = api.load("runs/demo")            # a run folder, its adapter/ folder or a checkpoint folder
print(model.answer("Which instrument is playing?", image="x.jpg", audio="y.wav"))
```

Either medium is optional. Without audio SAFE adds no audio tokens, so the answer is the base VL
model's own only when training changed nothing inside the base (no ``base`` part with ``unfreeze``, no
LoRA: :attr:`SAFE.base_is_original`); a run that trained LoRA or base modules (the demo's phase 3 trains
LoRA and ``language_projection``) answers image-only questions with those changes. The base's own answers
come from the original weights: :class:`safe_av.eval.run.OriginalModel` (see ``docs/inference.md``).
``answer_batch`` takes ``[{"question": ..., "image": ..., "audio": ...}]``. Bad inputs raise
:class:`safe_av.eval.run.InputError` naming the item and the field; bad arguments raise ``ValueError`` /
``TypeError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from safe_av.data.records import DataError
from safe_av.data.text import move_batch
from safe_av.eval.run import InputError, LoadedCheckpoint, load_checkpoint, unknown_fields_error


#: ``SAFE``'s defaults (``None`` asks for them)
DEFAULT_MAX_NEW_TOKENS, DEFAULT_BATCH_SIZE = 16, 8


def _count(name: str, value, default: int | None = None) -> int | None:
    """``value`` checked as a count >= 1 (``None``: ``default``)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1 (None for the default)")
    return int(value)


def _media_error(where: str, name: str, value, err: DataError) -> InputError:
    """``where: field 'audio' = 'x.wav': file not found``: the field and the path named once (``err`` names them
    too; `DataError.detail_under`)."""
    return InputError(f"{where}: field {name!r} = {str(value)!r}: {err.detail_under(name, value)}")


def prepare_item(question: str, image=None, audio=None, *, sampling_rate: int, max_seconds: float = 10.0,
                 where: str = "input") -> dict:
    """Load one request into a collate item; :class:`InputError` names ``where`` and the field.

    Args:
        question: the question (``""`` asks for an audio caption).
        image: an image path, a frame folder, a PIL image (16-bit and float ones rescaled as files are), or None.
        audio: an audio path (read as training reads it: mono, resampled, its first ``max_seconds``, peak
            normalised), a 1-D float waveform at ``sampling_rate`` (cut to ``max_seconds`` and peak normalised the
            same way, so a clip gets the same answer as an array as from its file), or None.
    """
    from PIL import Image

    from safe_av.data.audio import SILENT_REASON, load_audio, peak_normalise
    from safe_av.data.vision import load_image, pil_to_rgb

    if not isinstance(question, str):
        raise InputError(f"{where}: field 'question' must be a string, got {type(question).__name__}")
    for field, value in (("image", image), ("audio", audio)):
        # "" (and Path(""), which is Path(".")) would read the working directory as a frame folder or a clip
        if (isinstance(value, str) and not value.strip()) or (isinstance(value, Path) and str(value) == "."):
            raise InputError(f"{where}: field {field!r} is an empty path (leave it out, or null, for none)")
    item = {"question": question, "answer": None, "image": None, "meta": {}}
    if image is not None:
        if isinstance(image, Image.Image):
            try:
                item["image"] = pil_to_rgb(image)
            except DataError as err:
                raise _media_error(where, "image", "<PIL image>", err) from err
        elif isinstance(image, (str, Path)):
            try:
                item["image"] = load_image(image)
            except DataError as err:
                raise _media_error(where, "image", image, err) from err
        else:
            raise InputError(f"{where}: field 'image' must be a path or a PIL image, got {type(image).__name__}")
    if audio is not None:
        if isinstance(audio, (str, Path)):
            try:
                clip = load_audio(audio, target_sr=sampling_rate, max_seconds=max_seconds)
            except DataError as err:
                raise _media_error(where, "audio", audio, err) from err
            item["waveform"], item["num_valid"] = clip.waveform, clip.num_valid
        else:
            if isinstance(audio, (bytes, bytearray, memoryview)):
                raise InputError(f"{where}: field 'audio' must be a path or a 1-D float waveform at "
                                 f"{sampling_rate} Hz, got {type(audio).__name__} (decode the file first, "
                                 "or pass its path)")
            try:
                if torch.is_tensor(audio):
                    audio = audio.detach().cpu().float().numpy()
                wave = np.asarray(audio, dtype=np.float32)
            except (TypeError, ValueError) as err:
                raise InputError(f"{where}: field 'audio' must be a path or a 1-D float waveform at "
                                 f"{sampling_rate} Hz, got {type(audio).__name__} ({err})") from None
            if wave.ndim != 1 or wave.size == 0 or not np.isfinite(wave).all():
                raise InputError(f"{where}: field 'audio': expected a non-empty finite 1-D waveform at "
                                 f"{sampling_rate} Hz, got shape {wave.shape}")
            n_out = int(round(sampling_rate * max_seconds))
            wave, silent = peak_normalise(wave[:n_out])  # as load_audio treats a file's samples
            if silent:
                raise InputError(f"{where}: field 'audio': {SILENT_REASON}")
            item["waveform"] = np.pad(wave, (0, n_out - len(wave)))
            item["num_valid"] = len(wave)
    return item


class SAFE:
    """A loaded SAFE model: ``answer(...)`` and ``answer_batch(...)``.

    Attributes:
        model: the :class:`~safe_av.models.safe_model.SAFEModel` (eval mode).
        processor: its :class:`~safe_av.data.text.SAFEProcessor`.
        cfg: the run's config.
        max_new_tokens: default answer length limit.
        batch_size: ``answer_batch``'s default batch size.
    """

    def __init__(self, loaded: LoadedCheckpoint, *, max_new_tokens: int | None = None, batch_size: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.cfg = loaded.cfg
        self.max_new_tokens = _count("max_new_tokens", max_new_tokens, DEFAULT_MAX_NEW_TOKENS)
        self.batch_size = _count("batch_size", batch_size, DEFAULT_BATCH_SIZE)

    @property
    def base_is_original(self) -> bool:
        """True when the loaded weights change nothing inside the base: every unfrozen base parameter equals its
        original (anchor) value and every LoRA ``lora_B`` is zero. Only then is an answer without audio the base
        VL model's own (``OriginalModel`` gives those in any case)."""
        params = dict(self.model.named_parameters())
        lora_idle = not any(bool(p.any()) for n, p in params.items() if "lora_B" in n)
        return lora_idle and all(torch.equal(params[k], v) for k, v in self.model.anchors.items())

    @property
    def sampling_rate(self) -> int:
        """The rate raw waveforms given as arrays must have."""
        return self.processor.sampling_rate

    def prepare(self, question: str, image=None, audio=None, *, where: str = "input",
                max_new_tokens: int | None = None) -> dict:
        """Load one request into a collate item (:func:`prepare_item` at this model's rate and clip length), its
        prompt checked to leave room for ``max_new_tokens`` (None: :attr:`max_new_tokens`) in the language model's
        positions."""
        item = prepare_item(question, image, audio, sampling_rate=self.sampling_rate,
                            max_seconds=self.cfg.data.max_audio_seconds, where=where)
        self._check_length(item, max_new_tokens or self.max_new_tokens, where)
        return item

    def _check_length(self, item: dict, max_new_tokens: int, where: str) -> None:
        limit = self.model.base.max_positions
        if limit is None:
            return
        n = len(self.processor.encode(item["question"], None, has_image=item.get("image") is not None,
                                      has_audio=item.get("waveform") is not None, count=False).input_ids)
        if n + max_new_tokens > limit:
            raise InputError(f"{where}: field 'question': the prompt takes {n} positions (media placeholders "
                             f"included) and max_new_tokens={max_new_tokens} more, beyond the language model's "
                             f"{limit}: shorten the question or lower max_new_tokens")

    @torch.no_grad()
    def generate_items(self, items: list[dict], *, max_new_tokens: int | None = None) -> list[str]:
        """Answers for items made by :meth:`prepare` (one batch). Their prompts were checked there against the
        ``max_new_tokens`` given to it; a larger one here that leaves no room is the model's ``ValueError``."""
        if not items:
            return []
        max_new_tokens = _count("max_new_tokens", max_new_tokens, self.max_new_tokens)
        batch = move_batch(self.processor.collate(items), self.model.device)
        return self.model.generate_from_batch(batch, max_new_tokens=max_new_tokens)

    def answer(self, question: str, image=None, audio=None, *, max_new_tokens: int | None = None) -> str:
        """The model's answer to ``question`` about ``image`` and/or ``audio`` (paths, PIL image, waveform).

        Raises:
            InputError: a bad question, image or audio (naming the field).
            ValueError: ``max_new_tokens`` < 1 (None: the default).
        """
        _count("max_new_tokens", max_new_tokens)
        item = self.prepare(question, image, audio, max_new_tokens=max_new_tokens)
        return self.generate_items([item], max_new_tokens=max_new_tokens)[0]

    def answer_batch(self, requests: list[dict], *, batch_size: int | None = None,
                     max_new_tokens: int | None = None) -> list[str]:
        """Answers for ``[{"question": ..., "image": ..., "audio": ...}, ...]`` in order.

        Raises:
            InputError: an item is not a dict, lacks ``question``, has an unknown field, or a file cannot be loaded
                (named by index).
            ValueError: ``batch_size`` or ``max_new_tokens`` < 1 (None: the defaults).
        """
        size = _count("batch_size", batch_size, self.batch_size)
        _count("max_new_tokens", max_new_tokens)
        if isinstance(requests, (str, bytes, dict)):
            raise InputError(f"requests: expected a list of dicts with 'question', got {type(requests).__name__}")
        items = []
        for i, req in enumerate(requests):
            where = f"requests[{i}]"
            if not isinstance(req, dict):
                raise InputError(f"{where}: expected a dict with 'question', got {type(req).__name__}")
            if "question" not in req:
                raise InputError(f"{where}: field 'question' is missing")
            unknown = unknown_fields_error(req, where)
            if unknown:
                raise InputError(unknown)
            items.append(self.prepare(req["question"], req.get("image"), req.get("audio"), where=where,
                                      max_new_tokens=max_new_tokens))
        out: list[str] = []
        for start in range(0, len(items), size):
            out.extend(self.generate_items(items[start:start + size], max_new_tokens=max_new_tokens))
        return out

    def __repr__(self) -> str:
        f = self.loaded.files
        return f"SAFE({f.kind}={str(f.weights)!r}, base={self.loaded.base_path or self.cfg.model.base!r})"


def load(path: str | Path, *, config=None, device: str | torch.device | None = None, max_new_tokens: int | None = None,
         batch_size: int | None = None) -> SAFE:
    """Load a trained SAFE model for inference.

    Args:
        path: a run folder (``RUN/``), an adapter folder (``RUN/adapter``) or a training checkpoint
            (``RUN/checkpoints/step-XXXXXXX``). The model is rebuilt from the run's ``config.yaml``.
        config: a :class:`~safe_av.config.SAFEConfig`, or the path of a YAML config, to use when the folder has
            no run config beside it.
        device: where to run (default: CUDA if available, else CPU).
        max_new_tokens: default answer length limit (>= 1; None: ``DEFAULT_MAX_NEW_TOKENS``, 16).
        batch_size: ``answer_batch``'s default batch size (>= 1; None: ``DEFAULT_BATCH_SIZE``, 8).

    Raises:
        FileNotFoundError: nothing loadable at ``path`` (or ``config`` not found).
        TypeError: ``config`` is neither a ``SAFEConfig`` nor a path.
        ValueError: a bad ``device`` / ``max_new_tokens`` / ``batch_size``, or an adapter that does not fit the
            base (``safe_av.eval.run.load_checkpoint``).
    """
    from safe_av.config import SAFEConfig, load_config

    _count("max_new_tokens", max_new_tokens)
    _count("batch_size", batch_size)
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif config is not None and not isinstance(config, SAFEConfig):
        raise TypeError(f"config: expected a safe_av.config.SAFEConfig or the path of a YAML config, got "
                        f"{type(config).__name__}")
    return SAFE(load_checkpoint(path, config, device=device), max_new_tokens=max_new_tokens, batch_size=batch_size)


__all__ = ["load", "SAFE", "InputError"]
