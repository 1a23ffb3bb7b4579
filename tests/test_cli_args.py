"""Bad arguments fail first: one line naming the argument, exit status 2, and nothing started (no
Prefect database in PREFECT_HOME, no run folder)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = str(Path(__file__).parent / "tiny.yaml")


@pytest.mark.parametrize("argv, message", [
    (["run", "--config", TINY, "--run-id", "../x"], "m3po run: --run-id '../x' must be a name of"),
    (["ipa", "--config", TINY, "--run-id", "a/b"], "m3po ipa: --run-id 'a/b' must be a name of"),
    (["status", "../x"], "m3po status: run id '../x' must be a name of"),
    (["rerun-failed", "x y"], "m3po rerun-failed: run id 'x y' must be a name of"),
    (["run", "--config", TINY, "--root", "nosuchproto://bucket"], "--root 'nosuchproto://bucket': not a directory or a URL"),
    (["run", "--config", TINY, "--root", "{file}"], "is a file, not a directory"),
    (["run", "--config", TINY, "--set", "training.epochs=many"], "training.epochs"),
    (["run", "--config", TINY, "--set", "no_such_section.x=1"], "unknown configuration key 'no_such_section'"),
    (["run", "--config", "{missing}"], "missing.yaml"),
    (["experiment", "--config", TINY, "--run-id", ".."], "m3po experiment: --run-id '..' must be a name of"),
    (["run", "--config", TINY, "--set", "name=../../etc"], "the configuration's name '../../etc' must be a name of"),
    (["worker", "--limit", "0"], "m3po worker: --limit 0"),
])
def test_a_bad_argument_is_one_line_and_exit_2_before_anything_starts(tmp_path, argv, message):
    (tmp_path / "a-file").write_text("")
    argv = [a.format(file=tmp_path / "a-file", missing=tmp_path / "missing.yaml") for a in argv]
    if "--root" not in argv and argv[0] != "worker":
        argv += ["--root", str(tmp_path / "runs")]
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (home / "prefect.db").exists() and not (tmp_path / "runs").exists()
