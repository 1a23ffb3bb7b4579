"""Nothing a command starts outlives it: the Prefect API server that `m3po run` starts for itself
(no PREFECT_API_URL configured) stops when the run ends normally and when the run is killed with
SIGKILL, which gives it no chance to clean up."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = str(Path(__file__).parent / "tiny.yaml")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def _server_of(proc: subprocess.Popen, deadline: float) -> int:
    while time.time() < deadline:
        for child in _children(proc.pid):
            if "m3po.flows.machinery.api_server" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                return child
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no API server started")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_runs_own_api_server_dies_with_a_killed_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "m3po.flows.cli", "run", "--config", TINY, "--root",
                             str(tmp_path / "runs"), "--set", "sampling.n=12"], env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = _server_of(proc, time.time() + 300)
    deadline = time.time() + 300  # killed once the run is under way: the server has served the flow
    while time.time() < deadline and not (tmp_path / "runs" / "tiny" / "prompts").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.time() + 60
    while time.time() < deadline and _alive(server):
        time.sleep(0.2)
    assert not _alive(server), f"API server {server} outlived the killed run"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_runs_own_api_server_stops_when_the_command_fails(tmp_path):
    """A run that fails (a data path that is not there) ends with its server stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "m3po.flows.cli", "run", "--config", TINY, "--root",
                             str(tmp_path / "runs"), "--set", "data.source=llava_instruct",
                             "--set", f"data.path={tmp_path}/none.json", "--set", f"data.image_root={tmp_path}",
                             "--set", "scoring.judge=openai:j", "--set", "evaluation.benchmarks=[]"],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = _server_of(proc, time.time() + 300)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "none.json: file not found" in out, out[-3000:]
    assert not _alive(server)
