"""Files never half-written (``aanet.files``): checkpoints, logs, plots, reports, exports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aanet.files import remove_stale_temporaries, replacing

ROOT = Path(__file__).resolve().parents[2]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    with (
        pytest.raises(OSError, match=r"^could not write .*eval.json .*: disk full$"),
        replacing(path) as tmp,
    ):
        tmp.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_write_that_ends_replaces_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "curves.png"  # the folder is made
    with replacing(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".png"  # writers that go by the name
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]
    (tmp_path / "plain").write_text("")  # the temporary was private (0600) when made
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_what_a_killed_writer_left_is_found_and_removed(tmp_path):
    """A process killed inside the block (SIGKILL: no cleanup runs) leaves its temporary; the
    next run removes exactly that, not the file itself nor another file's temporary."""
    path = tmp_path / "last.pt"
    path.write_text("complete")
    killed = (
        "import os, signal, sys\n"
        "from aanet.files import replacing\n"
        "with replacing(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", killed, str(path)], env=env, timeout=60)
    assert run.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(left) == 1 and left[0].read_text() == "half"
    other = tmp_path / ".log.csv.x1.tmp.csv"
    other.write_text("another file's")
    remove_stale_temporaries(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.pt"]
    assert path.read_text() == "complete"


@pytest.mark.parametrize("writer", ["torch.save", "write_text"])
def test_a_failed_write_names_the_target_and_its_free_space(tmp_path, monkeypatch, writer):
    """torch.save on a full disk says only "unexpected pos 832 vs 726", open() names the
    temporary: the error names the file being written and the space left beside it."""
    import torch

    path = tmp_path / "last.pt"

    def full_disk(*args, **kwargs):
        if writer == "torch.save":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832")
        raise OSError(28, "No space left on device", str(args[0]))

    if writer == "write_text":
        monkeypatch.setattr(Path, "write_text", full_disk)
    else:
        monkeypatch.setattr(torch, "save", full_disk)
    expected = RuntimeError if writer == "torch.save" else OSError
    with pytest.raises(expected) as raised, replacing(path) as tmp:
        if writer == "torch.save":
            torch.save({}, tmp)
        else:
            tmp.write_text("x")
    message = str(raised.value)
    assert f"could not write {path}" in message and "MiB free there" in message
    assert isinstance(raised.value.__cause__, expected)
    assert list(tmp_path.iterdir()) == []


def test_the_kind_of_a_failed_write_is_kept(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(PermissionError, match="could not write"), replacing(missing / "x") as tmp:
        raise PermissionError(13, "Permission denied", str(tmp))

    class OwnError(RuntimeError):
        pass

    with pytest.raises(OwnError, match="^mine$"), replacing(tmp_path / "y"):
        raise OwnError("mine")
