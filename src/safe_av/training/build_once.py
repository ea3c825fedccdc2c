"""Build a cache folder once and share it: the pretrained tiny base and tiny audio encoder.

``build_once(folder, what, build)`` returns ``folder`` when it holds a ``DONE`` marker; otherwise it
takes an inter-process lock, builds into ``<folder>.tmp`` with ``build(tmp)``, renames it into place
and writes ``DONE``. Two runs started together (``safe reproduce`` seeds, a second terminal) would
otherwise both train the same model and race on the rename: the first builds, the others wait on the
lock (an advisory ``flock`` on ``<folder>.lock``; a no-op where ``fcntl`` does not exist) and reuse it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DONE = "DONE"


def is_built(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file()


def build_once(folder: str | Path, what: str, build: Callable[[Path], None]) -> Path:
    """``folder`` after ``build(tmp)`` has filled it, unless a complete one is there already."""
    folder = Path(folder)
    if is_built(folder):
        log.info("%s: reusing %s", what, folder)
        return folder
    with folder_lock(folder):
        if is_built(folder):
            log.info("%s: built by another run meanwhile, reusing %s", what, folder)
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        (folder / DONE).write_text("")
    return folder


@contextlib.contextmanager
def folder_lock(folder: str | Path):
    """Hold an exclusive lock for ``folder`` (blocking) inside the ``with`` block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.with_name(folder.name + ".lock")
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s is being built by another process: waiting for it", folder)
            t0 = time.time()
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("%s: lock acquired after %.0f s", folder, time.time() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
