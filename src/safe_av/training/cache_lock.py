"""An inter-process lock for cache folders built once and shared (pretrained tiny models).

Two runs started together (``safe reproduce`` seeds, a user's second terminal) would otherwise both
train the same cached model and race on its final rename. The lock is an advisory ``flock`` on a
``<folder>.lock`` file beside the folder: the first run builds, the others wait, then find ``DONE``.
Where ``fcntl`` does not exist (Windows) it is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


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
