"""Child processes that do not outlive their parent, however the parent ends (SIGKILL included):
Linux's PR_SET_PDEATHSIG asks the kernel to signal the child when the thread that started it dies.
Limit: Linux only (elsewhere these do nothing, and a killed parent's children are left to the OS);
the signal follows the starting *thread*, so a child must be started by a thread that waits for it.
"""
from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> bool:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """A `preexec_fn` for subprocess.Popen: `sig` to the child when its starting thread dies. SIGTERM
    by default, so a launcher (the API server, `accelerate launch`) can stop its own children."""
    _set_pdeathsig(sig)


def exit_with_parent(sig: int = signal.SIGKILL) -> None:
    """Called by a process at its start: `sig` to itself when its parent dies, and at once if the
    parent is already gone (it may have died before this call)."""
    if _set_pdeathsig(sig) and os.getppid() == 1:  # checked after the call: a death before it is seen
        os.kill(os.getpid(), sig)
