"""Write a file so that the destination is either absent/old or complete: temp file beside it, then rename."""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def atomic_file(dest: str | Path):
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed onto `dest`.
    Partials left by killed runs (`.NAME.partial-PID.*` of a dead pid) are removed first."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    for p in dest.parent.glob(f".{dest.name}.partial-*"):
        try:
            pid = int(p.name.split(".partial-", 1)[1].split(".")[0])
        except (ValueError, IndexError):
            continue
        if not pid_alive(pid):
            p.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-{os.getpid()}.", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(folder=False))  # mkstemp makes 0600; the file gets the user's usual mode
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(dest: str | Path, obj, indent: int = 1) -> None:
    """Write JSON to `dest` atomically (a reader never sees half a file; an interrupted run leaves the old one)."""
    import json

    with atomic_file(dest) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=indent))
