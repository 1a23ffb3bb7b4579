"""How the `m3po` command ends: Python's shutdown steps, then the process exits without running
the C++ libraries' static destructors.

Why: Arrow's thread pools, torn down by those destructors while a worker thread is still alive
(a read-ahead that outlived its read), abort a finished command with `terminate called without an
active exception` and exit status -6, at random and after every file was written (apache/arrow
#34314, #39862). Everything Python itself does at exit still happens, in its order: non-daemon
threads are joined (executors shut down first), `atexit` handlers run (Prefect's last log lines,
the ephemeral API server's stop), logging and the standard streams are flushed. Only for the
command line: code that calls `main()` keeps its interpreter.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading


def exit_now(status: int | None) -> None:
    """End the process with `status` (None: 0) after Python's own exit steps."""
    code = 0 if status is None else int(status)
    try:
        threading._shutdown()  # what the interpreter runs first at exit: executors, then thread joins
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a failing exit step: the normal exit, which reports it
        sys.exit(code)
    os._exit(code)
