"""Output paths, checked before any work starts, and names that are safe to print.

Every command checks each output path it was given (`--json`, `--draw`, `--report`, `--out`, ...)
before it loads a model or an image, so a run never does minutes of work and then fails to
write, and a bad path is one line (`error: ...`, exit 2) rather than a traceback. Nothing here
deletes or replaces anything: a file output may later overwrite the regular file the user named,
a folder output writes into an existing or new folder, and bundles have their own stricter rule
(`converters.bundle.check_destination`: only a bundle this project wrote is ever replaced).
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from edge.errors import OutputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# Raster formats Pillow writes (and every viewer opens): `--draw` needs one of these suffixes.


def display(path) -> str:
    """A path as text that any terminal or UTF-8 file takes: bytes that are not UTF-8 in a file name
    (held by Python as surrogates) are shown as `\\xNN` escapes instead of raising UnicodeEncodeError."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by the set-and-restore idiom."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(folder: bool) -> int:
    """The mode a plain `open()` / `mkdir` would give a new file or folder under the current umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def _describe_oserror(e: OSError) -> str:
    if e.errno in (errno.EROFS,):
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or type(e).__name__


def check_writable_folder(folder: Path, what: str) -> None:
    """`folder` exists, is a folder, and a file can be created in it (probed: a temporary file is made
    and removed, since permission bits lie for root and for read-only or special file systems)."""
    folder = Path(folder)
    try:
        st = folder.stat()
    except FileNotFoundError:
        raise OutputError(f"{what}: folder {display(folder)} does not exist") from None
    except OSError as e:
        raise OutputError(f"{what}: cannot use folder {display(folder)} ({_describe_oserror(e)})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what}: {display(folder)} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edge-write-check-", dir=folder)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {display(folder)} ({_describe_oserror(e)})") from None
    os.close(fd)
    os.unlink(probe)


def existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` (itself excluded) that exists."""
    p = Path(os.path.abspath(path)).parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_file(path, what: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """A file to be written (or overwritten, if it is a regular file): its folder must exist and take
    files; an existing folder, device or pipe at that path is refused, as is a suffix not in `suffixes`."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{what}: {display(path)!s} is not a file name")
    if os.path.lexists(p):
        if p.is_dir():
            raise OutputError(f"{what}: {display(p)} is an existing folder; give a file name")
        if not p.is_file():
            raise OutputError(f"{what}: {display(p)} exists and is not a regular file")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise OutputError(f"{what}: {display(p)} needs an image extension ({', '.join(suffixes)})")
    check_writable_folder(p.parent if str(p.parent) else Path("."), what)
    return p


def check_output_folder(path, what: str, create_parents: bool = False) -> Path:
    """A folder to write files into: an existing folder that takes files, or a new one whose parent
    exists and takes files (with `create_parents`, its nearest existing ancestor)."""
    p = Path(path)
    if str(path) == "":
        raise OutputError(f"{what}: an empty path is not a folder")
    if os.path.lexists(p):
        if not p.is_dir():
            raise OutputError(f"{what}: {display(p)} exists and is not a folder")
        check_writable_folder(p, what)
        return p
    parent = existing_ancestor(p) if create_parents else Path(os.path.abspath(p)).parent
    check_writable_folder(parent, what)
    return p


def distinct_names(paths, suffix: str) -> list[str]:
    """One output file name per input path, all different: the stem, then the stem with the input's
    extension where stems collide (photo.webp, photo.bmp -> photo_webp, photo_bmp), then the parent
    folders' names, then a counter. Deterministic for a given list."""
    paths = [Path(p) for p in paths]
    names = [p.stem for p in paths]
    for widen in (lambda i: f"{paths[i].stem}_{paths[i].suffix.lstrip('.')}" if paths[i].suffix else paths[i].stem,
                  lambda i: "_".join([*paths[i].parent.parts[-2:], names[i]]).strip("/_") or names[i]):
        dup = {n for n in names if names.count(n) > 1}
        names = [widen(i) if n in dup else n for i, n in enumerate(names)]
    taken: set[str] = set()
    out = []
    for n in names:
        name, k = n + suffix, 1
        while name in taken:  # a counter: same folder and name twice, or a counter meeting a real stem
            k += 1
            name = f"{n}_{k}{suffix}"
        taken.add(name)
        out.append(name)
    return out


def check_args(args, files=(), folders=(), images=()) -> None:
    """Check a command's output options before any work: `files` name --json-like options (a file),
    `folders` --report-like ones (a folder, existing or new), `images` --plot-like ones (a file with an
    image extension). Names are the argparse attributes (e.g. "save_txt" for --save-txt)."""
    for kind, names in (("file", files), ("folder", folders), ("image", images)):
        for name in names:
            value = getattr(args, name, None)
            if not value:
                continue
            opt = "--" + name.replace("_", "-")
            if kind == "folder":
                check_output_folder(value, opt)
            else:
                check_output_file(value, opt, IMAGE_SUFFIXES if kind == "image" else None)
