"""``aanet`` run in a child process that the file system's permissions apply to.

Root reads and writes whatever the mode bits say (the capabilities CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH), so as root (CI) the child drops those two from its bounding set before
it starts Python: it stays root, the owner of the test's files, and a mode such as 0555 or 0000
then denies it as it would deny their owner. (Running the child as ``nobody`` instead would
need the interpreter and the checkout readable by others: CI's virtual environment may sit in
a home folder only root may enter.) As another user the child runs as it is."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_PR_CAPBSET_DROP = 24  # <linux/prctl.h>
_DAC_CAPABILITIES = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (<linux/capability.h>)


def _drop_permission_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _DAC_CAPABILITIES:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability})")


def start_denied(*argv: str) -> subprocess.Popen[str]:
    """``python -m aanet *argv`` started with the permissions in force (see the module's
    docstring), its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "aanet", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_drop_permission_override if os.geteuid() == 0 else None,
    )


def run_denied(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """:func:`start_denied`, waited for."""
    with start_denied(*argv) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The one error line of a run that failed as bad input does (exit status 2, no
    traceback), without its prefix and its ``--debug`` note."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    prefix, note = f"aanet {command}: error: ", " (aanet --debug: traceback)"
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and lines[0].endswith(note), result.stderr[-3000:]
    return lines[0].removeprefix(prefix).removesuffix(note)
