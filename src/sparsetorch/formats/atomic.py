"""Atomic file writes: readers see the old file or the whole new one, never a half-written one."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "atomic_path", "STALE_AFTER_S"]

STALE_AFTER_S = 86400  # a temp file this old is a killed writer's, whatever its pid says


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Write bytes to ``path`` so readers see either the old file or the whole new one.

    The temp file ``.NAME.<pid>.<random>.tmp`` sits next to ``path`` and is removed on every exit path
    (exceptions, KeyboardInterrupt; SIGTERM/SIGHUP become exceptions while writing from the main thread).
    A run killed outright (SIGKILL, power loss) leaves it behind: the next save of the same ``path`` removes
    the temp files of that naming whose writer pid is dead, or that are older than a day; a live
    concurrent writer's temp file is left alone."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(payload)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_write`` for a writer that wants a file name (e.g. ``safetensors.torch.save_file``, which streams
    the tensors instead of building the whole file in memory first): yields the temp file's path; when the
    block ends without an exception the file is fsynced and replaces ``path``, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    with signals_raise(path):
        try:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
            yield Path(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def remove_stale_temps(path: Path) -> None:
    """Delete temp files of earlier writes to ``path`` whose writer is dead (or that are very old)."""
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(?:(\d+)\.)?[A-Za-z0-9_]+\.tmp$")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if not found:
            continue
        pid = int(found.group(1)) if found.group(1) else None  # None: older naming, judged by age only
        try:
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if pid is not None and pid != os.getpid() and not stale:
                stale = not pid_alive(pid)
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:
            pass  # raced with its owner or another cleaner


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def signals_raise(path: Path) -> Iterator[None]:
    """While writing, SIGTERM/SIGHUP raise (so the temp file is cleaned up) where they would kill us."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum} while writing {path}")

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is None:
                continue
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(sig) in (signal.SIG_DFL, None):
                    handlers[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
