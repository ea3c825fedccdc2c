"""Atomic checkpoints and exact resume, without pickle.

Layout of ``run_dir/checkpoints/step-0000120/``::

    model.safetensors                     the model state given (usually the trainable part)
    optimizer.json + optimizer.safetensors optimizer.state_dict(): tensors under keys like
                                          "state.0.exp_avg", everything else (param_groups,
                                          non-tensor state) in the JSON
    scheduler.json                        scheduler.state_dict()
    scaler.json                           AMP GradScaler state (if any)
    train_state.json (+ .safetensors)     curriculum state, sampler position, counters …
    rng.json + rng.safetensors            python / numpy / torch CPU (+ CUDA) RNG states
    rng_rank<i>.json (+ .safetensors)     every rank's RNG states, under several processes
    config.yaml                           the resolved config
    meta.json                             step, metric, versions, and what the caller adds (``meta``:
                                          the trainer's base_path / audio_encoder_path, as adapter_config.json)
    COMPLETE                              written last

Protocol: everything is written (and fsynced) into ``.tmp-step-0000120``, the folder is
renamed to ``step-0000120``, then ``COMPLETE`` is written. Only folders with ``COMPLETE``
count, so a crash at any point leaves :func:`find_latest` on the previous checkpoint.
Then the last ``keep_last`` complete checkpoints and the best one (by the metric recorded
in ``meta.json``) are kept; older ones and crash leftovers are deleted.

Nested states go through a small JSON codec: tensors become ``{"__tensor__": key}`` (the
tensor in the ``.safetensors`` twin), tuples, int-keyed dicts and numpy arrays are tagged,
so every state comes back with the same types and bit-identical values.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor
from torch.optim import Optimizer

FORMAT = "safe_av.checkpoint/1"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"

Metric = tuple[str, float, Literal["max", "min"]]


# ---- JSON codec ----------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors are moved into ``tensors`` under their path."""
    if isinstance(obj, Tensor):
        if path in tensors:
            raise ValueError(f"cannot save: two entries map to the tensor key {path!r}")
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__intkeys__": {str(k): _encode(v, _join(path, str(k)), tensors) for k, v in obj.items()}}
        raise ValueError(f"cannot save {path or 'state'!r}: dict keys must be all str or all int")
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, _join(path, str(i)), tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot save {path or 'state'!r}: unsupported type {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__intkeys__"}:
        return {int(k): _decode(v, tensors) for k, v in obj["__intkeys__"].items()}
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__ndarray__", "dtype"}:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---- durable file writing ------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors file; tensors sharing storage (tied weights) are cloned apart."""
    seen: set[int] = set()
    flat: dict[str, Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        flat[key] = t
    _write_bytes(path, save(flat, metadata={"format": FORMAT}))


def _write_state(folder: Path, name: str, state: Any) -> None:
    """``name.json`` plus, if the state holds tensors, ``name.safetensors``."""
    tensors: dict[str, Tensor] = {}
    encoded = _encode(state, "", tensors)
    _write_bytes(folder / f"{name}.json", json.dumps(encoded).encode())
    if tensors:
        _write_tensors(folder / f"{name}.safetensors", tensors)


def _read_state(folder: Path, name: str) -> Any:
    """Inverse of :func:`_write_state`; ``None`` if ``name.json`` is absent."""
    json_path = folder / f"{name}.json"
    if not json_path.is_file():
        return None
    tensor_path = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    return _decode(json.loads(json_path.read_text()), tensors)


# ---- RNG -----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch (+ CUDA) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]  # a resume on fewer GPUs keeps what fits
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)


# ---- listing and rotation ------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    """``step-0000120`` for step 120."""
    return f"step-{step:07d}"


def _complete(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` sorted by step."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _metric(ckpt: Path) -> dict[str, Any] | None:
    meta_path = ckpt / "meta.json"
    return json.loads(meta_path.read_text()).get("metric") if meta_path.is_file() else None


def _best(complete: list[tuple[int, Path]]) -> Path | None:
    """Best checkpoint by the most recently recorded metric name (first one on ties)."""
    scored = [(p, m) for _, p in complete if (m := _metric(p)) is not None]
    if not scored:
        return None
    name, mode = scored[-1][1]["name"], scored[-1][1]["mode"]
    same = [(p, m["value"]) for p, m in scored if m["name"] == name]
    sign = 1.0 if mode == "max" else -1.0
    return max(same, key=lambda pv: sign * pv[1])[0]


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, its ``COMPLETE`` first: rmtree deletes in directory order, and a crash part-way
    must not leave a folder that still says complete while its weights are gone (``find_latest`` would pick it,
    and loading it fail)."""
    (path / COMPLETE).unlink(missing_ok=True)
    _fsync_dir(path)
    shutil.rmtree(path)


def drop_after(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Remove the complete checkpoints of ``run_dir`` saved after ``step``: a run resumed from an earlier checkpoint
    abandons them (its metrics.jsonl is cut there too), and ``find_latest`` must not return to them after a crash.
    Each loses its ``COMPLETE`` first. Returns the removed folders."""
    removed = []
    for s, path in _complete(Path(run_dir) / "checkpoints"):
        if s > step:
            _remove(path)
            removed.append(path)
    return removed


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint of a run (``None`` if there is none).

    Folders without ``COMPLETE`` (a crash after the rename) and ``.tmp-*`` folders (a crash
    before it) are ignored.
    """
    complete = _complete(Path(run_dir) / "checkpoints")
    return complete[-1][1] if complete else None


def find_best(run_dir: str | os.PathLike) -> Path | None:
    """Complete checkpoint with the best recorded metric (``None`` if none has one)."""
    return _best(_complete(Path(run_dir) / "checkpoints"))


def _rotate(root: Path, keep_last: int, current: Path) -> None:
    """Delete all but the last ``keep_last`` complete checkpoints, the best and ``current``."""
    complete = _complete(root)
    keep = {p for _, p in complete[-keep_last:]} | {current}
    best = _best(complete)
    if best is not None:
        keep.add(best)
    for _, p in complete:
        if p not in keep:
            _remove(p)
    for p in root.iterdir():  # crash leftovers: tmp folders and step folders never completed
        leftover = p.name.startswith(_TMP_PREFIX) or (
            _STEP_DIR.match(p.name) and not (p / COMPLETE).exists()
        )
        if leftover and p.is_dir() and p != current:
            shutil.rmtree(p)


# ---- save / load ---------------------------------------------------------------------------


def _check_save_args(step: int, keep_last: int, best_metric: Metric | None) -> None:
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1, got {keep_last}")
    if best_metric is not None:
        name, value, mode = best_metric
        if mode not in ("max", "min") or not math.isfinite(value):
            raise ValueError(
                f"save_checkpoint: best_metric must be (name, finite value, 'max'|'min'), got {best_metric!r}"
            )


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move the finished temporary folder to its final name."""
    if final.exists():  # re-saving a step (e.g. after resuming from it): replace it
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, Tensor],
    optimizer: Optimizer,
    scheduler: Any | None,
    scaler_state: dict[str, Any] | None,
    train_state: dict[str, Any],
    rng: bool = True,
    rank_rng: list[dict[str, Any]] | None = None,
    config_yaml: str,
    keep_last: int = 3,
    best_metric: Metric | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically and rotate old ones (main process only).

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints/``.
        step: global optimizer step (names the folder, ``step-%07d``).
        model_state: name → tensor (e.g. the trainable parameters' state dict).
        optimizer: its ``state_dict()`` is saved.
        scheduler: an LR scheduler whose ``state_dict()`` is JSON-able (``LambdaLR`` from
            :func:`safe_av.training.schedule.build_scheduler` is), or ``None``.
        scaler_state: ``GradScaler.state_dict()`` or ``None``.
        train_state: JSON-able resume state (curriculum, sampler position, counters, best …).
        rng: also save python/numpy/torch(/CUDA) RNG states.
        rank_rng: with several processes, every rank's RNG states (index = rank, from :func:`rng_state`),
            saved as ``rng_rank<i>``; each rank restores its own on resume.
        config_yaml: the resolved config, saved as ``config.yaml``.
        keep_last: complete checkpoints to keep (the best is kept in addition).
        best_metric: ``(name, value, "max"|"min")`` of this checkpoint, for best-keeping.
        meta: JSON-able entries added to ``meta.json``: what loading the checkpoint needs besides the
            weights, e.g. ``base_path`` / ``audio_encoder_path`` (the same values the final
            ``adapter_config.json`` records), so a run that never finished loads around the same base
            from any working directory. Its keys may not be the ones written here (``format``, ``step``,
            ``metric``, ``time``, ``torch``).

    Returns:
        The final checkpoint folder.

    Raises:
        ValueError: bad arguments or a state value that cannot be saved (naming its key).
    """
    _check_save_args(step, keep_last, best_metric)
    clash = sorted(set(meta or {}) & {"format", "step", "metric", "time", "torch"})
    if clash:
        raise ValueError(f"save_checkpoint: meta may not set {clash} (written by save_checkpoint itself)")
    try:
        json.dumps(meta or {})
    except (TypeError, ValueError) as err:
        raise ValueError(f"save_checkpoint: meta is not JSON-able ({err})") from None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    bad = [k for k, v in model_state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"save_checkpoint: model_state[{bad[0]!r}] is not a tensor")
    _write_tensors(tmp / "model.safetensors", model_state)
    _write_state(tmp, "optimizer", optimizer.state_dict())
    if scheduler is not None:
        _write_state(tmp, "scheduler", scheduler.state_dict())
    if scaler_state is not None:
        _write_state(tmp, "scaler", scaler_state)
    _write_state(tmp, "train_state", train_state)
    if rng:
        _write_state(tmp, "rng", rng_state())
        for i, state in enumerate(rank_rng or []):
            _write_state(tmp, f"rng_rank{i}", state)
    _write_bytes(tmp / "config.yaml", config_yaml.encode())
    metric = None if best_metric is None else dict(zip(("name", "value", "mode"), best_metric))
    record = {"format": FORMAT, "step": step, "metric": metric, "time": time.time(),
              "torch": torch.__version__}
    _write_bytes(tmp / "meta.json", json.dumps({**record, **(meta or {})}).encode())
    _fsync_dir(tmp)
    _publish(tmp, final)
    _write_bytes(final / COMPLETE, b"")
    _fsync_dir(final)
    _rotate(root, keep_last, final)
    return final


def _check_groups(optimizer: Optimizer, saved: dict[str, Any], path: Path) -> None:
    """Saved param groups must line up with the optimizer's (names and sizes)."""
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"{path}: optimizer has {len(groups)} param groups, checkpoint has {len(saved_groups)}")
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        name, saved_name = g.get("name", i), s.get("name", i)
        if name != saved_name or len(g["params"]) != len(s["params"]):
            raise ValueError(
                f"{path}: param group {i} is {name!r} with {len(g['params'])} params, checkpoint "
                f"has {saved_name!r} with {len(s['params'])}"
            )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    optimizer: Optimizer | None,
    scheduler: Any | None,
    restore_rng: bool = True,
    rank: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Restore optimizer, scheduler and RNG states in place; return the rest.

    The optimizer gets the saved param groups verbatim (lr, betas, weight decay …) and its
    state moved to each parameter's device. Load the model state *before* continuing.

    Args:
        path: a checkpoint folder (e.g. from :func:`find_latest`).
        optimizer: built over the same parameters in the same groups, or ``None`` to skip.
        scheduler: built over ``optimizer``, or ``None`` to skip.
        restore_rng: set python/numpy/torch(/CUDA) RNG states to the saved ones.
        rank: this process's rank: its own saved states (``rng_rank<rank>``) when the checkpoint has them,
            else the main process's.

    Returns:
        ``(model_state, scaler_state or None, train_state)``; tensors on CPU.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint (no ``COMPLETE``).
        ValueError: mismatching param groups, or a scheduler given but none saved.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {COMPLETE} marker): {path}")
    model_state = load_file(str(path / "model.safetensors"))
    if optimizer is not None:
        saved = _read_state(path, "optimizer")
        _check_groups(optimizer, saved, path)
        optimizer.load_state_dict(saved)
    if scheduler is not None:
        sched_state = _read_state(path, "scheduler")
        if sched_state is None:
            raise ValueError(f"{path}: a scheduler was given but the checkpoint has no scheduler.json")
        scheduler.load_state_dict(sched_state)
    if restore_rng:
        saved_rng = _read_state(path, f"rng_rank{rank}")
        if saved_rng is None:
            saved_rng = _read_state(path, "rng")
        if saved_rng is not None:
            _restore_rng(saved_rng)
    return model_state, _read_state(path, "scaler"), _read_state(path, "train_state")
