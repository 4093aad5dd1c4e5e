"""The run folder's safety: checked before any work, locked while a process trains into it, cleared of the
temporary files an interrupted atomic write leaves, never silently overwritten, and write failures
(full disk, read-only or vanished folder, file size limit) turned into one clear message that names the
file and the reason."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock
    fcntl = None

LOCK_NAME = ".lock"
# Files the engine writes with coatnet.utils.atomic_write; their temporaries are ".<name>.<random>.tmp".
RUN_FILES = ("checkpoint-last.safetensors", "checkpoint-best.safetensors", "checkpoint-last.state.safetensors",
             "config.json", "metrics.jsonl", "curves.png")


_held_lock_fds: set[int] = set()  # descriptors of the run-folder locks this process holds


def _close_held_locks_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file description; if it kept it, the lock
    # would outlive a killed trainer for as long as its orphaned workers live. The parent's copy holds it.
    for fd in _held_lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class RunFolderError(OSError):
    """The run folder cannot be used or written (the message says which file and why)."""

    def __str__(self) -> str:  # OSError's own str() would prefix "[Errno n]"
        return self.args[0] if self.args else super().__str__()


def io_reason(e: BaseException) -> str:
    """The operating system's reason in an error from open()/write() or from safetensors' writer (which
    raises its own error type with the OS message inside: "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"(?:I/O error|IoError)[:(]\s*(.*?)(?: \(os error \d+\))?\)?$", text)
    return m.group(1) if m else text


def prepare_run_folder(out: Path) -> None:
    """Create `out` if needed and prove it writable by writing a file in it, before any training work:
    a file in its place, a read-only file system or a missing permission is an error naming the path."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"run folder {out} is an existing file, not a folder: pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=out)
        try:
            os.write(fd, b"coatnet")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise RunFolderError(f"cannot write to run folder {out}: {io_reason(e)}") from None


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (flock on out/.lock, released by the kernel even on SIGKILL): a second
    process training into the same folder is refused instead of interleaving its checkpoints. Without
    fcntl (Windows) there is no lock."""
    if fcntl is None:
        yield
        return
    path = out / LOCK_NAME
    # Read-only descriptor: holding it does not keep the file system from being remounted read-only.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunFolderError(f"run folder {out} is in use by another training process (pid {holder}); "
                                 f"wait for it to finish or pass another --out") from None
        _held_lock_fds.add(fd)
        with contextlib.suppress(OSError):  # who holds it, for the message above (only the holder writes)
            path.write_text(str(os.getpid()))
        yield
    finally:
        _held_lock_fds.discard(fd)
        os.close(fd)  # releases the lock


def _is_temporary(name: str) -> bool:
    # ours: .<run file>.<random>.tmp; safetensors' writer (Rust tempfile): .tmp<6 letters/digits>
    return (name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES + ("write-test",))
            or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name) is not None)


def remove_stale_temp_files(out: Path) -> list[str]:
    """Delete the temporaries of atomic writes that a killed process left in `out` (our atomic_write's
    and safetensors' own); returns their names. Call with the folder locked."""
    removed = []
    for p in out.iterdir():
        if p.name.startswith(".") and _is_temporary(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return sorted(removed)


@contextlib.contextmanager
def writing(path: Path, kept: str) -> Iterator[None]:
    """Turn a failure while writing `path` into a RunFolderError naming it, the reason, and `kept` (what is
    still on disk, e.g. "the previous checkpoint (epoch 2) is kept")."""
    try:
        yield
    except RunFolderError:
        raise
    except OSError as e:
        raise RunFolderError(f"could not write {path}: {io_reason(e)}; {kept}") from e
    except Exception as e:  # safetensors' SafetensorError carries the OS error in its message
        if not re.search(r"I/O error|IoError|os error \d+", str(e)):
            raise
        raise RunFolderError(f"could not write {path}: {io_reason(e)}; {kept}") from e
