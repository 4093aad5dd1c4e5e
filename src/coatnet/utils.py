"""Small shared helpers: atomic file writes, reading a JSON object, allocator tuning."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import difflib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process's umask: from /proc on Linux (reading it with os.umask means changing it for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp (and writers that replace the file, such as safetensors) leave it private (0600): give it
        # the mode open() would, 0666 less the umask.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def rounded(value, digits: int = 6):
    """`value` (a number, or dicts and lists of them) with every float rounded to `digits` decimal places, and
    below 1 to `digits` significant digits (a learning rate of 1.6e-6 stays that): JSON that shows what was
    measured (0.0244419, not 0.024441871792078018), never off by more than 1e-6. Ints and bools are kept."""
    if isinstance(value, float):
        return round(value, digits) if abs(value) >= 1 else float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


_LOOKALIKES = str.maketrans("oil", "011")  # after lower(): O and 0, I, l and 1 look alike in most fonts


def closest(word: str, options) -> str | None:
    """The option that `word` spells but for case and look-alike characters ("coatnet_O" -> 'coatnet_0', not
    'coatnet_7'), else the closest by difflib on lower case, or None."""
    options = list(options)
    same = {o.lower().translate(_LOOKALIKES): o for o in options}.get(word.lower().translate(_LOOKALIKES))
    if same is not None:
        return same
    by_lower = {o.lower(): o for o in options}
    close = difflib.get_close_matches(word.lower(), by_lower, n=1)
    return by_lower[close[0]] if close else None


def did_you_mean(word: str, options) -> str:
    """"; did you mean 'x'?" for the closest of `options` to a mistyped `word` (see `closest`), or ""."""
    close = closest(word, options)
    return f"; did you mean {close!r}?" if close is not None else ""


def no_such_path(path: str | os.PathLike, what: str) -> FileNotFoundError:
    """FileNotFoundError for a `what` ("checkpoint", "--data") at a path that does not exist, with the nearest
    name in its folder ("did you mean 'runs/fm/checkpoint-best.safetensors'?") or the missing folder named."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return FileNotFoundError(f"{what} {path}: no such file or folder (there is no folder {parent})")
    near = closest(path.name, sorted(p.name for p in parent.iterdir()))
    return FileNotFoundError(f"{what} {path}: no such file or folder"
                             f"{f'; did you mean {str(parent / near)!r}?' if near is not None else ''}")


def data_folder_error(data: str | os.PathLike) -> Exception | None:
    """Why `data` (--data) cannot be an image folder or a shard folder, or None when it can: a missing path (with
    the nearest name), or a file, such as one image of the folder."""
    path = Path(data)
    if path.is_file():
        return ValueError(f"--data {path} is a file, not a folder: give the ImageFolder root, whose subfolders are "
                          f"the classes (here perhaps {path.parent.parent})")
    if not path.exists():
        return FileNotFoundError(f"{no_such_path(path, '--data')} (use 'fashion-mnist' or an image folder)")
    return None


def plural(count: int, noun: str) -> str:
    """"1 epoch", "2 epochs"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in the file at `path`; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_memory_reuse_enabled = False


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process and serve every size from its heap.

    By default glibc serves allocations above 32 MB with fresh mmap() pages and unmaps them on free, so
    each forward pass of a CNN at batch 8 and 224 px page-faults in its largest activations again (a
    third of the CPU time of a pass here). After this call they are reused. Process-wide and not undone:
    the process's resident memory stays at its peak. Returns whether the setting took (glibc only)."""
    global _memory_reuse_enabled
    if _memory_reuse_enabled:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _memory_reuse_enabled = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _memory_reuse_enabled


def figure(**kwargs):
    """A matplotlib Figure with its own Agg canvas, made without pyplot: no global backend is chosen and no
    pyplot state is kept (a library must not switch its caller's backend), and nothing needs closing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def lazy_exports(package: str, names: dict[str, str]):
    """(__getattr__, __dir__) for a package whose `names` (name -> submodule) are imported on first use (PEP
    562), so that importing the package loads none of them (and no torch: `--help` stays fast)."""
    import importlib

    module = sys.modules[package]

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(module, name, value)  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(module), *names})

    return __getattr__, __dir__
