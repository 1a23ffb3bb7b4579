"""The first run on a fresh machine gets past the ephemeral API's start: the CLI gives it a budget
that fits a cold database on 2 cores, and a user's own setting wins."""
from m3po.flows import cli


def test_the_cli_gives_the_ephemeral_api_time_to_start(monkeypatch):
    monkeypatch.delenv(cli.STARTUP_SETTING, raising=False)
    cli.ephemeral_startup_budget()
    import os

    assert os.environ[cli.STARTUP_SETTING] == cli.EPHEMERAL_STARTUP_SECONDS
    from prefect.settings import Settings

    # the variable is the one Prefect reads (settings built now see it), and it is above its 20 s
    assert Settings().server.ephemeral.startup_timeout_seconds == int(cli.EPHEMERAL_STARTUP_SECONDS) > 20


def test_a_users_own_startup_budget_wins(monkeypatch):
    monkeypatch.setenv(cli.STARTUP_SETTING, "45")
    cli.ephemeral_startup_budget()
    import os

    assert os.environ[cli.STARTUP_SETTING] == "45"


def test_an_api_that_does_not_start_is_one_line_with_what_to_do(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), cli.STARTUP_SETTING: "0"})
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--config",
                          str(Path(__file__).parent / "tiny.yaml"), "--root", str(tmp_path / "runs")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "ephemeral API server did not start within 0 s" in out.stderr and "PREFECT_API_URL" in out.stderr
    assert not (tmp_path / "runs" / "tiny" / "prompts").exists()  # nothing started
