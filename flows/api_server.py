"""The Prefect API a command starts for itself when none is configured, which dies with it.

Prefect's own ephemeral mode starts `uvicorn prefect.server.api.server:create_app` as a child of
whichever process first needs the API, and stops it at exit; a command killed with SIGKILL (the OOM
killer, a pre-empted node) never exits, so that server was left running, orphaned. Here the command
starts the same server (`python -m m3po.flows.api_server PORT PARENT_PID`, Prefect's ephemeral
settings: no UI), points PREFECT_API_URL at it, and the server watches its parent: once the parent
is gone it shuts down (SIGTERM to itself, a hard exit after `GRACE` seconds). Linux also delivers
SIGTERM at the parent's death (PR_SET_PDEATHSIG), so the two paths back each other up.
Limit: a server someone else configured (PREFECT_API_URL) is theirs and left alone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from m3po_core.child_processes import die_with_parent

GRACE = 10.0  # seconds the server has to finish its writes after its parent died
WATCH_EVERY = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(startup_seconds: float) -> tuple[subprocess.Popen, str]:
    """Start the server, wait for /health; (process, API URL). TimeoutError if it is not up in time."""
    import urllib.request

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    deadline = time.time() + startup_seconds
    while True:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "m3po.flows.api_server", str(port), str(os.getpid())],
                                env=env, preexec_fn=die_with_parent if threading.current_thread() is threading.main_thread() else None)
        url = f"http://127.0.0.1:{port}/api"
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return proc, url
            except OSError:
                pass
            time.sleep(0.1)
        if proc.poll() is not None and time.time() < deadline:
            continue  # the port was taken in between (uvicorn exits): another one
        stop(proc)
        raise TimeoutError(f"the Prefect API server did not answer within {startup_seconds:g} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_EVERY)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(GRACE)
    os._exit(1)


def main(port: int, parent: int) -> None:
    import uvicorn

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
