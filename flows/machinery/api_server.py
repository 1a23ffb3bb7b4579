"""The Prefect API a command starts for itself when none is configured, which dies with it.

Prefect's own ephemeral mode starts `uvicorn prefect.server.api.server:create_app` as a child of
whichever process first needs the API, and stops it at exit; a command killed with SIGKILL (the OOM
killer, a pre-empted node) never exits, so that server was left running, orphaned. Here the command
starts the same server (`python -m m3po.flows.machinery.api_server PORT PARENT_PID`, Prefect's ephemeral
settings: no UI), points PREFECT_API_URL at it, and the server watches its parent: once the parent
is gone it shuts down (SIGTERM to itself, a hard exit after `GRACE` seconds). Linux also delivers
SIGTERM at the parent's death (PR_SET_PDEATHSIG), so the two paths back each other up.
Also the ephemeral API's startup budget (`ephemeral_startup_budget`): 180 s rather than Prefect's 20.
Limit: a server someone else configured (PREFECT_API_URL) is theirs and left alone.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from m3po_core.child_processes import die_with_parent

# A cold Prefect database on 2 cores takes 20-28 s to create and migrate before the ephemeral API
# answers, and Prefect waits 20 s by default: a first run on a fresh machine would often not start.
EPHEMERAL_STARTUP_SECONDS = "180"
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def ephemeral_startup_budget() -> None:
    """Give the ephemeral API time to start on a fresh machine, unless the user set a budget (in the
    environment or in the active Prefect profile: theirs wins). Must run before Prefect is imported:
    Prefect reads its settings once, at import, so the profile is read here from its file."""
    if STARTUP_SETTING in os.environ or STARTUP_SETTING in active_profile():
        return
    os.environ[STARTUP_SETTING] = EPHEMERAL_STARTUP_SECONDS


def active_profile() -> dict:
    """The settings of the active Prefect profile (PREFECT_PROFILES_PATH, else PREFECT_HOME/profiles.toml)."""
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10: no profile check, the default applies unless the environment sets it
        return {}
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {})



def api_configured() -> bool:
    """A Prefect API the user chose (the environment or the active profile); else a command starts
    its own (`own_server_started`), which dies with it."""
    if "prefect" in sys.modules:  # already imported (a caller's own settings, a test harness): its view
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    return "PREFECT_API_URL" in os.environ or "PREFECT_API_URL" in active_profile()


def own_server_started() -> bool:
    """For a command that runs flows: the API the user configured, or a server of its own started
    here (PREFECT_API_URL pointed at it), stopped at exit after Prefect's own exit handlers (registered
    later, run earlier) have sent the last log lines to it; killed with the command, it stops by
    itself. False, said on stderr, when it did not start within the startup budget."""
    if api_configured():
        return True
    budget = float(os.environ.get(STARTUP_SETTING) or active_profile().get(STARTUP_SETTING) or EPHEMERAL_STARTUP_SECONDS)
    try:
        server, os.environ["PREFECT_API_URL"] = start(budget)
    except TimeoutError:
        print(f"m3po: Prefect's ephemeral API server did not start within {budget:g} s; raise {STARTUP_SETTING}, "
              "or start a server (`prefect server start`) and set PREFECT_API_URL to it", file=sys.stderr)
        return False
    atexit.register(stop, server)
    return True

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
        proc = subprocess.Popen([sys.executable, "-m", "m3po.flows.machinery.api_server", str(port), str(os.getpid())],
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
