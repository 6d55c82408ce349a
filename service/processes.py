"""The one way a child process is stopped: SIGTERM, a grace period, then SIGKILL, and reaped."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence


def stop_processes(
    procs: Sequence[subprocess.Popen], timeout_s: float, *, resume: bool = False
) -> None:
    """Ask every running one to stop at once (so their grace periods overlap), then wait up to
    ``timeout_s`` for each in turn and SIGKILL what is left. ``resume``: send SIGCONT first,
    since a stopped (SIGSTOP) process would never act on SIGTERM."""
    for p in procs:
        if p.poll() is None:
            if resume:
                p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_process(proc: subprocess.Popen, timeout_s: float, *, resume: bool = False) -> int:
    """``stop_processes`` for one; its exit status (negative: the signal that ended it)."""
    stop_processes([proc], timeout_s, resume=resume)
    return int(proc.returncode)
