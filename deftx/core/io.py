"""Filesystem helpers: directories written atomically and replaced safely, output checks made
before any work starts, file digests.

An output directory is written in a temporary sibling (``.NAME.tmp-<pid>-*``) and moved into place
when complete. Replacing an existing directory is allowed only for a directory of the same kind
that deftx wrote (an :class:`OutputKind` recognises it by its metadata file), never for the
current directory or one of its parents. The swap is one atomic ``renameat2(RENAME_EXCHANGE)``
where the system supports it; elsewhere the old directory is moved aside and put back if the new
one cannot take its place. Folders stranded by a killed process are recovered or removed the next
time the same target is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deftx.errors import DeftxError


class OutputError(DeftxError):
    """An output location cannot be written, or may not be replaced."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and replacing it was not asked for."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replace_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file beside it, so a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a ``DeftxError`` naming the file if it is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DeftxError(f"{path}: cannot read JSON ({exc})") from None


# -- what deftx wrote ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """A kind of directory deftx writes, recognised by the JSON metadata file it always contains."""

    description: str                                  # e.g. "an SFT directory"
    metadata_file: str                                # e.g. "sft.json"
    matches: Callable[[dict[str, Any]], bool]         # is this metadata deftx's?

    def recognises(self, directory: Path) -> bool:
        try:
            doc = json.loads((directory / self.metadata_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and bool(self.matches(doc))


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised ('.' and '..' resolved lexically, symlinks kept)."""
    return Path(os.path.abspath(os.fspath(path)))


def _protected(target: Path) -> str | None:
    cwd = absolute(os.getcwd())
    if target == cwd or target in cwd.parents:
        return "it is the current directory or one of its parents"
    if target == absolute(Path.home()):
        return "it is your home directory"
    if target.parent == target:
        return "it is the filesystem root"
    return None


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_writable(directory: str | os.PathLike) -> Path:
    """Raise :class:`OutputError` unless files can be created in ``directory`` (or, if it does not
    exist yet, in the nearest folder above it that does, where it would be created). Tries a real
    write: permission bits do not tell about read-only mounts, and root ignores them."""
    directory = absolute(directory)
    probe = _nearest_existing(directory)
    if not probe.is_dir():
        raise OutputError(f"cannot write to {directory}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".deftx-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: {exc.strerror or exc} ({probe})") from None
    return directory


def check_output_location(directory: str | os.PathLike) -> Path:
    """Before any work: ``directory`` (where a run keeps its files) is a directory or can be
    created as one, and is writable. Raises :class:`OutputError`; returns the absolute path."""
    directory = absolute(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory} exists and is a file, not a directory")
    return check_writable(directory)


def check_output_dir(target: str | os.PathLike, overwrite: bool, kind: OutputKind,
                     hint: str = "use --overwrite to replace it") -> Path:
    """Before any work: ``target`` may be written as ``kind``. It must not exist, or (with
    ``overwrite``) be a directory of that kind that deftx wrote; its folder must be writable.
    Raises :class:`OutputError` with a one-line message; returns the absolute target."""
    target = absolute(target)
    reason = _protected(target)
    if reason:
        raise OutputError(f"refusing to write {kind.description} to {target}: {reason}")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(f"{target} exists and is a file, not a directory")
        if not overwrite:
            raise OutputExistsError(f"{target} already exists ({hint})")
        if not kind.recognises(target):
            raise OutputError(f"refusing to replace {target}: it is not {kind.description} written by deftx (no "
                              f"deftx {kind.metadata_file} in it); choose another output or remove it yourself")
    check_writable(target.parent)
    return target


# -- atomic writes and safe replacement -------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where that is unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stranded(target: Path, what: str) -> list[Path]:
    """``.NAME.<what>-<pid>-*`` siblings of ``target`` left by processes that are gone."""
    out = []
    prefix = f".{target.name}.{what}-"
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            pid = path.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                out.append(path)
    return out


def recover_stranded(target: str | os.PathLike) -> Path | None:
    """Repair what a killed replacement of ``target`` may have left: if ``target`` is missing but
    the copy that was being replaced was moved aside (``.NAME.old-*``), put it back; remove other
    folders of dead writers (``.NAME.tmp-*``, ``.NAME.old-*``). Returns the restored path, if any."""
    target = absolute(target)
    restored = None
    olds = sorted(_stranded(target, "old"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    if olds and not (target.exists() or target.is_symlink()):
        newest = olds.pop()
        with contextlib.suppress(OSError):
            os.replace(newest, target)
            restored = target
    for path in olds + _stranded(target, "tmp"):
        _remove(path)
    return restored


def replace_directory(source: Path, target: Path) -> None:
    """Move the complete directory ``source`` to ``target`` (a sibling), replacing what is there.
    At every point either the old or the new directory is at ``target``."""
    if not (target.exists() or target.is_symlink()):
        os.replace(source, target)
        _fsync_dir(target.parent)
        return
    if _exchange(source, target):          # target is new; source holds the old directory
        _fsync_dir(target.parent)
        _remove(source)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(old, target)             # put the old directory back
        raise
    _fsync_dir(target.parent)
    _remove(old)


def _follow_umask(root: Path) -> None:
    """Give everything below ``root`` the modes a plain ``open``/``mkdir`` would (some writers,
    safetensors among them, create their files 0600)."""
    mask = current_umask()
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        elif path.is_file():
            executable = path.stat().st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux exposes it (``/proc``)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(x for x in f if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)   # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False,
                     kind: OutputKind | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    A crash or exception inside the block leaves ``target`` as it was. With ``overwrite=False`` an
    existing ``target`` is an error; with ``overwrite=True`` it is replaced only if it is a ``kind``
    directory (see :func:`check_output_dir`; without ``kind`` any existing directory is refused).
    """
    target = absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_stranded(target)
    if target.exists() or target.is_symlink():
        if kind is None:
            raise OutputExistsError(f"{target} already exists")
        check_output_dir(target, overwrite, kind, hint="pass overwrite=True to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes it 0700; the result follows the umask
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
        replace_directory(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
