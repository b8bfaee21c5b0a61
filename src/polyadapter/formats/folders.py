"""Replacing a folder safely: the one routine every writer uses (save, convert, train,
merge, store export).

    replace_folder(dst, fill, overwrite=True)   # fill(tmp) writes the new content

Guarantees:
- it never deletes something that is not an adapter folder (or, for ``kind="model"``,
  a model folder) or an empty folder; a file or an unrelated folder at ``dst`` is refused;
- ``dst`` is never empty or half-written: the new content is written and fsynced in a
  hidden sibling folder first, then swapped in with one atomic ``renameat2`` exchange
  (Linux); where the file system cannot exchange, two renames with the previous folder
  parked at a fixed hidden sibling, ``.<name>.previous``;
- an interruption at any point — an exception, Ctrl-C, or the process killed — leaves
  ``dst`` holding either the old or the new content, at once or after :func:`recover`,
  which every writer and every reader (``detect_format``) runs first: it moves a parked
  previous folder back when ``dst`` is missing, and deletes leftovers of writers that
  are no longer running.

``_after_step`` is a fault-injection point for tests: called with each step's name
("written", "parked", "swapped", "cleaned"), it may raise or end the process there.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import PolyAdapterError

ADAPTER_MARKERS = ("polyadapter.json", "adapter_config.json", "adapter_fusion_config.json")  # ours, PEFT, AdapterHub
MODEL_MARKERS = ("config.json",)
PARTIAL = ".partial-"      # .<name>.partial-<pid>-<random>: a folder being written
PREVIOUS = ".previous"     # .<name>.previous: the old folder during a two-rename swap

_after_step: Callable[[str], None] | None = None


class DestinationError(PolyAdapterError, OSError):
    """A destination cannot be written: it is not a folder we may replace, or not writable."""


class DestinationExistsError(DestinationError, FileExistsError):
    """The destination exists and replacing it was not asked for."""


def _step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


def is_replaceable(path: Path, kind: str = "adapter") -> bool:
    """True for an empty folder or a folder of ``kind`` ("adapter" or "model")."""
    if not path.is_dir() or path.is_symlink():
        return False
    markers = ADAPTER_MARKERS if kind == "adapter" else MODEL_MARKERS + ADAPTER_MARKERS
    return not any(path.iterdir()) or any((path / m).is_file() for m in markers)


def check_destination(dst: Path, overwrite: bool, kind: str = "adapter") -> None:
    """DestinationError unless ``dst`` may be written: absent, or (with ``overwrite``)
    a folder :func:`is_replaceable` admits; and its parent is a writable folder."""
    dst = Path(dst)
    if "\0" in str(dst):
        raise DestinationError(f"{str(dst)!r}: a path cannot hold a NUL character")
    recover(dst)
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise DestinationExistsError(f"{dst}: already exists; pass overwrite=True (--overwrite) to replace it")
        if not is_replaceable(dst, kind):
            what = "a file" if not dst.is_dir() else "a symbolic link" if dst.is_symlink() else \
                f"a folder that is not {'an adapter' if kind == 'adapter' else 'a model or adapter'} folder"
            raise DestinationError(f"{dst}: is {what}; refusing to replace it (choose another destination)")
    parent = _existing_ancestor(dst.parent)
    if not parent.is_dir():
        raise DestinationError(f"{dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"{dst}: cannot write in {parent} (permission denied)")


def replace_folder(dst: Path, fill: Callable[[Path], None], overwrite: bool = False, kind: str = "adapter") -> Path:
    """Write a folder at ``dst`` through ``fill(tmp)``, all or nothing (see the module doc)."""
    dst = Path(dst)
    check_destination(dst, overwrite, kind)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{PARTIAL}{os.getpid()}-", dir=dst.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        _step("written")
        if not dst.exists():
            os.rename(tmp, dst)
            _fsync_dir(dst.parent)
            _step("swapped")
        elif _exchange(tmp, dst):  # tmp now holds the previous folder
            _fsync_dir(dst.parent)
            _step("swapped")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            previous = _previous(dst)
            os.rename(dst, previous)
            _step("parked")
            os.rename(tmp, dst)
            _fsync_dir(dst.parent)
            _step("swapped")
            shutil.rmtree(previous, ignore_errors=True)
        _step("cleaned")
    except BaseException:
        if not dst.exists() and _previous(dst).is_dir():
            os.rename(_previous(dst), dst)  # interrupted between the two renames: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_file(path: Path, data: bytes) -> None:
    """Write one file atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def recover(dst: Path) -> None:
    """Finish what an interrupted :func:`replace_folder` at ``dst`` left: a parked
    previous folder goes back when ``dst`` is missing (else it is deleted); partial
    folders of writers no longer running are deleted."""
    dst = Path(dst)
    parent = dst.parent
    if not parent.is_dir():
        return
    previous = _previous(dst)
    try:
        if previous.is_dir():
            if not dst.exists():
                os.rename(previous, dst)
                _fsync_dir(parent)
            else:
                shutil.rmtree(previous, ignore_errors=True)
        prefix = f".{dst.name}{PARTIAL}"
        for leftover in parent.iterdir():
            if leftover.name.startswith(prefix) and not _writer_alive(leftover.name[len(prefix):]):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
    except OSError:  # a read-only place: nothing we could have written there
        pass


def _previous(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}{PREVIOUS}")


def _writer_alive(suffix: str) -> bool:
    pid_text = suffix.split("-", 1)[0]
    if not pid_text.isdigit():
        return True  # not ours: leave it
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process is not writing it now (one writer per call)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---------------------------------------------------------------------- the atomic swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or file system cannot, so the caller falls back to two renames."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ---------------------------------------------------------------------- durability
def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)
