"""Atomic file and directory writes: a crash leaves the old content or none, never half.

Temporary files and directories sit beside their target as hidden
``.NAME.mrm-tmp-PID@HOST.RANDOM.tmp`` entries (``mrm-old`` for the old content being replaced).
The next atomic write of the same target removes those whose writer (same host, process gone)
no longer runs, so a killed job's leftovers do not pile up. Written files and directories get
the permissions the umask gives (not the temporary files' private 0600 / 0700), and no
directory is created through a ``..`` (``a/../x`` never creates ``a``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

_TMP, _OLD = "mrm-tmp", "mrm-old"


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An operating-system error without a file name (a full disk in write or fsync) gets
    ``path``'s, so that the message says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}@{_host()}."


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and restore it at once)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(path: PathLike) -> None:
    """Removes the temporary entries of earlier atomic writes of ``path`` whose writer, a
    process of this host, is gone; an ``mrm-old`` one is put back as ``path`` if ``path`` is
    missing (the writer died between moving the old content aside and moving the new in)."""
    path = Path(path)
    _remove_stale(path.parent, re.escape(path.name), path)


def remove_stale_in(directory: PathLike) -> None:
    """:func:`remove_stale` for every target in ``directory`` (for directories of files that
    are each written once under a new name, like the embedding cache's shards)."""
    _remove_stale(Path(directory), r"(?:.+)", None)


def _remove_stale(directory: Path, name: str, path) -> None:
    pattern = re.compile(rf"^\.({name})\.({_TMP}|{_OLD})-(\d+)@(.+)\.[A-Za-z0-9_]+\.tmp$")
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    me = _host()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        target, kind, pid, host = match.group(1), match.group(2), int(match.group(3)), match.group(4)
        if host != me or pid == os.getpid() or _alive(pid):
            continue
        path = directory / target
        with contextlib.suppress(OSError):
            if kind == _OLD and not path.exists() and (entry / "content").exists():
                os.replace(entry / "content", path)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def _make_parent(path: Path) -> None:
    """Creates ``path``'s missing parent directories, but none reached through ``..``."""
    parent = path.parent
    if parent.is_dir():
        return
    if ".." in parent.parts:
        raise FileNotFoundError(f"directory {parent} does not exist (mrm creates no directory through '..')")
    parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    with _naming(path):
        _make_parent(path)
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path, _TMP), suffix=".tmp", dir=path.parent)
    try:
        with _naming(path), os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it becomes ``path``.

    An existing ``path`` is replaced only when ``overwrite`` (else ``FileExistsError``). If the
    process dies part-way, ``path`` holds the old content (or nothing) and the temporary
    directory is left as a hidden ``.name.mrm-tmp-*`` sibling, never mistaken for the real one
    (and removed by the next write of ``path``).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    with _naming(path):
        _make_parent(path)
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, _TMP), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path, _OLD), suffix=".tmp", dir=path.parent))
            os.replace(path, old / "content")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path) -> Optional[dict]:
    """The JSON content of ``path``, None when there is no such file."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
