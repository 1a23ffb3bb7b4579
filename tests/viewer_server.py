"""`m3po view RUN` in a process of its own on a free port, for the tests that read its pages."""
import re
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager


@contextmanager
def serving(root: str, run_id: str, env: dict | None = None):
    """Yields the server's base URL; stops it after."""
    proc = subprocess.Popen([sys.executable, "-m", "m3po.flows.cli", "view", run_id, "--root", root, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if not found:
            raise AssertionError(f"m3po view did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
