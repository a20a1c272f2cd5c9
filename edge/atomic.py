"""The one atomic writer: a file or a folder is written under a temporary name beside its destination
(`.NAME.partial-PID.*`), fsynced, then renamed into place, so that the destination is either absent/old or
complete, whatever kills the run. Partials of dead processes are removed by the next writer."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from edge.outputs import default_mode


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT, so that every
    `finally` and temporary-folder cleanup runs before the process exits (code 143)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def terminate_cleanly() -> None:
    """Turn SIGTERM into `Terminated` for this process (commands call it once, in the main thread)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (partials of live writers are left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(dest: Path) -> list[Path]:
    """Remove the `.NAME.partial-PID.*` files and folders beside `dest` whose process is gone."""
    removed = []
    for p in dest.parent.glob(f".{dest.name}.partial-*"):
        try:
            pid = int(p.name.split(".partial-", 1)[1].split(".")[0])
        except (ValueError, IndexError):
            continue
        if not pid_alive(pid):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(dest: str | Path):
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed onto `dest`."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-{os.getpid()}.", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.chmod(tmp, default_mode(folder=False))  # mkstemp makes 0600; the file gets the user's usual mode
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(dest: str | Path, may_replace: Callable[[Path], bool]):
    """Yield a temporary folder beside `dest`; on success its files are fsynced and it replaces `dest` by rename.

    may_replace(dest) is asked just before the rename whether what is at `dest` then may be replaced (it raises
    or returns False to refuse), so that a folder of the user's that appeared there during the work is kept.
    The new folder gets the user's normal mode (umask), not the private mode of a temporary folder."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o777)  # umask applies, as for any folder the user makes
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        os.chmod(tmp, default_mode(folder=True))
        old = None
        if os.path.lexists(dest):
            if not may_replace(dest):
                raise FileExistsError(f"{dest} appeared during the work; it is left as it is")
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(dest: str | Path, obj, indent: int = 1) -> None:
    """Write JSON to `dest` atomically (a reader never sees half a file; an interrupted run leaves the old one)."""

    with atomic_file(dest) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=indent))
