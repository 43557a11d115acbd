"""Files that are never half-written: each is written under a temporary name beside its target,
flushed to disk, and renamed over the target (``os.replace``, atomic on one file system)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of ``path``'s temporary names: hidden, and ending with the target's
    suffix, so writers that go by the name (savefig, torch.export.save) take its format."""
    return f".{path.name}.", f".tmp{path.suffix}"


@contextlib.contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """A new temporary file beside ``path`` to write to. When the block ends without an error the
    file is flushed to disk and replaces ``path``; otherwise it is removed and ``path`` stays as
    it was. The file gets the mode any new file there gets (the umask's).

    A failed write is raised naming ``path`` and the free space beside it: the writers' own
    errors name the temporary (``open``) or nothing (``torch.save`` on a full disk: "unexpected
    pos 832 vs 726")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    except OSError as error:  # its message names the temporary, which the user never gave
        raise OSError(error.errno, _failed_write(path, error.strerror)) from error
    tmp = Path(name)
    try:
        # mkstemp makes the file private (0600); give it the mode any other file would get.
        os.fchmod(handle, 0o666 & ~_umask())
        os.close(handle)
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as error:
        # OSError(errno, ...) is the errno's subclass again (FileNotFoundError, PermissionError).
        if error.errno is None:
            raise OSError(_failed_write(path, str(error))) from error
        raise OSError(error.errno, _failed_write(path, error.strerror)) from error
    except RuntimeError as error:
        if type(error) is not RuntimeError:  # a subclass means something of its own: keep it
            raise
        raise RuntimeError(_failed_write(path, str(error))) from error
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(
    path: Path | str, option: str, inputs: dict[str, Path | str] | None = None
) -> None:
    """Raise naming ``option`` unless a file can be written at ``path`` (checked before the work
    that makes it, not after): not one of the ``inputs`` (what the command reads, by what it is:
    ``{"checkpoint": ...}``), which it would overwrite; not a folder; no file where one of its
    folders would be; and a file can be made in the nearest of its folders that exists (a
    probe, not ``os.access``: root may write anywhere by the permissions, not in ``/proc``)."""
    path = Path(path)
    for what, given in (inputs or {}).items():
        if _same_file(path, given):
            raise ValueError(f"{option}: {path} is the {what}, which it would overwrite")
    if path.is_dir():
        raise IsADirectoryError(f"{option}: {path} is a folder; give a file name")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"{option}: {folder} is a file, not a folder, in {path}")
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as error:
                message = f"{option}: cannot write in {folder}, for {path} ({error.strerror})"
                raise type(error)(message) from error  # PermissionError stays one
            break


def _same_file(path: Path, other: Path | str) -> bool:
    """Whether ``path`` and ``other`` are one file (through links and ``..`` too)."""
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist (or lies below a file): nothing to overwrite
        return False


def _failed_write(path: Path, reason: str) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"could not write {path} ({free}): {reason}"


def remove_stale_temporaries(path: Path | str) -> None:
    """Remove what a :func:`replacing` of ``path`` left when its process was killed mid-write."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    for stale in path.parent.glob(f"{prefix}*{suffix}"):
        stale.unlink(missing_ok=True)
