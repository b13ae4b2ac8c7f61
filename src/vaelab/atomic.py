"""The one way vaelab writes a file: checkpoints, weights, CSVs, JSON, PNG, NPY, HTML, cached data.

The content goes to a temp file beside the destination, `.NAME.PID-RANDOM.tmp`, which is
fsynced and renamed over the destination; then the folder is fsynced. Readers (and a run resumed
after a kill) see the previous complete file or the new complete one, never half of one. On any
error the temp file is removed, the destination keeps its previous content, and the error is a
`WriteError` naming the destination.

Three entry points over the same mechanism:

    atomic_write(dest, data)            bytes already in memory
    with atomic_file(dest) as f: ...    an open binary file (np.save(f, a), img.save(f, "PNG"))
    with atomic_path(dest) as tmp: ...  a path, for writers that only take one

A command that writes several files wraps them in `with together():` -- every write in the block
is renamed into place only when the block ends without an error, and an error removes every temp
file: the destinations are all old or all new (`vaelab generate` with --npy, `vaelab plot`).
Nothing in such a block may read back a file it wrote.

The writer's PID in a temp file's name tells a killed writer's leftovers from a live writer's
file: `clean_stale_temps` removes the first kind (the next command that owns the folder calls it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import WriteError

TEMP_SUFFIX = ".tmp"
# Temp files end in .tmp; `vaelab train --overwrite` trains into a sibling folder ending in .new
# and swaps it with the old run, which then ends in .old until it is removed.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]+\.(tmp|new|old)$")


# Inside `together()`: the (temp, destination, existed) triples waiting for the block's end.
_pending: ContextVar[list | None] = ContextVar("vaelab_atomic_pending", default=None)


def temp_path(dest: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """A fresh hidden name beside `dest` carrying this process's PID."""
    return dest.parent / f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def owner_alive(name: str) -> bool:
    """Whether the process whose PID is in a temp name (see `temp_path`) still runs. A name
    without a PID (written by vaelab before PIDs were in the names) has no live owner."""
    match = _TEMP_NAME.match(name)
    return bool(match) and pid_alive(int(match["pid"]))


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's process (or a PID out of range: not one of ours)
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files a killed writer left in `folder`; returns what was removed."""
    removed = []
    try:
        candidates = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if not p.is_dir()]
    except OSError:
        return removed
    for p in candidates:
        if not owner_alive(p.name):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass  # read-only or gone meanwhile: nothing this command can do
    return removed


def clean_stale_siblings(dest: Path) -> None:
    """Remove the hidden sibling folders of `dest` (`temp_path(dest, ".new")` builds, ".old" swaps)
    that killed processes left behind."""
    import shutil

    dest = Path(dest)
    try:
        siblings = list(dest.parent.glob(f".{dest.name}.*"))
    except OSError:
        return
    for p in siblings:
        if p.suffix in (".new", ".old") and p.is_dir() and not p.is_symlink() and not owner_alive(p.name):
            shutil.rmtree(p, ignore_errors=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE): a reader sees either
    the old pair or the new one. Where the system or filesystem lacks it, `a` is renamed away and
    `b` into place: a kill between the two leaves neither at `a` (both remain, renamed)."""
    if not _renameat2_exchange(a, b):
        aside = temp_path(a, ".old")
        os.rename(a, aside)
        os.rename(b, a)
        os.rename(aside, b)
    _fsync_folder(Path(a).parent)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_folder(folder: Path) -> None:
    # After the rename has happened: a folder that cannot be fsynced (some network or FUSE
    # filesystems) still holds the complete new file, so this is best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(e: OSError, folder: Path) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno is None:  # NumPy's short write ("N requested and M written") carries no errno
        try:
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize < 1 << 20:
                return f"No space left on device: {reason}"
        except OSError:
            pass
    return reason


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `dest` (already created, empty); when the block ends, its content
    replaces `dest`. Writers given the path must be told the format explicitly (the temp name
    ends in .tmp), e.g. `fig.savefig(tmp, format="png")`."""
    dest = Path(dest)
    existed = dest.exists()
    if dest.is_dir():
        raise WriteError(dest, "it is a folder", existed)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))  # umask applies
    except OSError as e:
        raise WriteError(dest, _reason(e, dest.parent), existed) from None
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        pending = _pending.get()
        if pending is not None:
            pending.append((tmp, dest, existed))
            return
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOENT and not tmp.parent.exists():
            raise WriteError(dest, f"its folder {tmp.parent} vanished", existed) from None
        raise WriteError(dest, _reason(e, dest.parent), existed) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(dest.parent)


@contextmanager
def together() -> Iterator[None]:
    """Writes inside the block replace their destinations only when it ends without an error
    (see the module docstring). Nested blocks join the outermost one."""
    if _pending.get() is not None:
        yield
        return
    pending: list = []
    token = _pending.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _pending.reset(token)
    for i, (tmp, dest, existed) in enumerate(pending):
        try:
            os.replace(tmp, dest)
        except OSError as e:
            for later, _, _ in pending[i:]:
                later.unlink(missing_ok=True)
            raise WriteError(dest, _reason(e, dest.parent), existed) from None
    for folder in dict.fromkeys(dest.parent for _, dest, _ in pending):
        _fsync_folder(folder)


@contextmanager
def atomic_file(dest: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file open for writing; when the block ends, its content replaces `dest`."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            yield f


def atomic_write(dest: str | Path, data: bytes) -> None:
    """Write `data` to `dest` atomically (see the module docstring)."""
    with atomic_file(dest) as f:
        f.write(data)


@contextmanager
def folder_lock(folder: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock (`flock`) on `folder` itself, held inside the block, so that
    processes about to build the same cached file take turns: the second finds the first one's
    result instead of building it again. No lock file is left behind. `on_wait` is called once if
    another process holds the lock. Nothing is created: where the folder does not exist or cannot
    be opened, no lock (there is then no cache to share, or writing fails with its own message)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
