"""Output directories: written atomically, replaced only when deftx wrote them (same kind), never
lost when a replacement is interrupted at any point, stranded folders recovered, unwritable
locations found before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deftx.core import io as dio
from deftx.core.io import (
    OutputError,
    OutputKind,
    atomic_directory,
    check_output_dir,
    check_output_location,
    check_writable,
    recover_stranded,
    replace_directory,
)

KIND = OutputKind("a test directory", "meta.json", lambda doc: doc.get("format") == "deftx-test")


def _write(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").write_text(json.dumps({"format": "deftx-test"}))
    (directory / "payload.txt").write_text(text)
    return directory


def _payload(directory: Path) -> str:
    return (directory / "payload.txt").read_text()


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


def test_new_directory_then_replacement_of_its_own_kind(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, kind=KIND) as tmp:
        _write(tmp, "one")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target, kind=KIND) as tmp:
            _write(tmp, "two")
    with atomic_directory(target, overwrite=True, kind=KIND) as tmp:
        _write(tmp, "two")
    assert _payload(target) == "two" and _siblings(target) == ["out"]


@pytest.mark.parametrize("setup,message", [
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "not a test directory written by deftx"),
    (lambda d: (d.mkdir(), (d / "meta.json").write_text('{"format": "other"}')), "not a test directory"),
    (lambda d: (d.mkdir(), (d / "meta.json").write_text("{broken")), "not a test directory"),
    (lambda d: d.write_text("a file"), "is a file, not a directory"),
])
def test_overwrite_refuses_what_deftx_did_not_write(tmp_path, setup, message):
    target = tmp_path / "victim"
    setup(target)
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
    with pytest.raises(OutputError, match=message):
        check_output_dir(target, overwrite=True, kind=KIND)
    with pytest.raises(OutputError, match=message):
        with atomic_directory(target, overwrite=True, kind=KIND) as tmp:
            _write(tmp, "new")
    after = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
    assert after == before and _siblings(target) == ["victim"]


@pytest.mark.parametrize("where", [".", "..", "sub/..", "{home}"])
def test_overwrite_refuses_the_working_directory_its_parents_and_home(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    _write(work, "mine")                     # even one that looks like deftx's
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    target = where.format(home=work)
    with pytest.raises(OutputError, match="refusing to write a test directory to"):
        check_output_dir(target, overwrite=True, kind=KIND)
    assert _payload(work) == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_an_exception_inside_the_block_keeps_the_old_directory(tmp_path):
    target = _write(tmp_path / "out", "old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True, kind=KIND) as tmp:
            _write(tmp, "new")
            raise RuntimeError("disk full (simulated)")
    assert _payload(target) == "old" and _siblings(target) == ["out"]


def test_replacement_is_one_atomic_exchange_where_supported(tmp_path, monkeypatch):
    calls = []
    real = dio._exchange

    def spy(a, b):
        calls.append((a.name, b.name))
        return real(a, b)

    monkeypatch.setattr(dio, "_exchange", spy)
    target = _write(tmp_path / "out", "old")
    with atomic_directory(target, overwrite=True, kind=KIND) as tmp:
        _write(tmp, "new")
    assert len(calls) == 1 and calls[0][1] == "out"
    assert _payload(target) == "new" and _siblings(target) == ["out"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_fallback_replacement_puts_the_old_directory_back_when_the_new_one_cannot_move(tmp_path, monkeypatch,
                                                                                       failure):
    """Without an atomic exchange the old directory is moved aside first; an interrupt or error
    before the new one is in place moves it back."""
    monkeypatch.setattr(dio, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise failure("interrupted between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(dio.os, "replace", replace)
    target = _write(tmp_path / "out", "old")
    with pytest.raises(failure):
        with atomic_directory(target, overwrite=True, kind=KIND) as tmp:
            _write(tmp, "new")
    assert _payload(target) == "old" and _siblings(target) == ["out"]


def test_a_killed_replacement_is_recovered_on_the_next_write(tmp_path):
    """What a SIGKILL between the two renames of the fallback leaves (the target gone, the old copy
    in .NAME.old-<dead pid>-*, the new one in .NAME.tmp-<dead pid>-*) is repaired: the old copy is
    put back, the temporary folder removed."""
    dead = _dead_pid()
    target = tmp_path / "out"
    _write(tmp_path / f".out.old-{dead}-1a2b", "old")
    _write(tmp_path / f".out.tmp-{dead}-3c4d", "half")
    assert recover_stranded(target) == target
    assert _payload(target) == "old" and _siblings(target) == ["out"]
    # and through the normal path: the next write sees the restored directory
    _write(tmp_path / f".out.tmp-{dead}-5e6f", "half again")
    with pytest.raises(FileExistsError):
        with atomic_directory(target, kind=KIND) as tmp:
            _write(tmp, "new")
    assert _payload(target) == "old" and _siblings(target) == ["out"]


def test_folders_of_a_live_writer_are_left_alone(tmp_path):
    live = _write(tmp_path / f".out.tmp-{os.getpid()}-aaaa", "in progress")
    with atomic_directory(tmp_path / "out", kind=KIND) as tmp:
        _write(tmp, "new")
    assert live.is_dir() and _payload(tmp_path / "out") == "new"


def test_replace_directory_of_a_symlinked_target(tmp_path):
    real = _write(tmp_path / "real", "old")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    new = _write(tmp_path / ".link.tmp-1-x", "new")
    replace_directory(new, link)
    assert not link.is_symlink() and _payload(link) == "new" and _payload(real) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_writable_checks(tmp_path):
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"   # created later under tmp_path
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_writable(blocker / "sub")
    with pytest.raises(OutputError, match="exists and is a file, not a directory"):
        check_output_location(blocker)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_read_only_location_is_found_before_any_work(tmp_path):
    """As root, permission bits do not stop writes; a read-only mount (in a private mount
    namespace) does, and the check must try a real write."""
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("import sys\nfrom deftx.core.io import check_writable, OutputError\n"
            "try:\n    check_writable(sys.argv[1])\nexcept OutputError as e:\n    print(e)\n")
    done = subprocess.run(["unshare", "--mount", "sh", "-c",
                           f"mount --bind -o ro {ro} {ro} && exec {sys.executable} -c \"$0\" {ro}/sft", code],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"cannot write to {ro}/sft: Read-only file system"), done.stdout + done.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
