"""The first run on a fresh machine gets past the ephemeral API's start: the CLI gives it a budget
that fits a cold database on 2 cores, and a user's own setting wins."""
from m3po.flows.machinery import api_server


def _budget_prefect_sees(tmp_path, env: dict, profile: str | None = None) -> int:
    """The start-up budget Prefect reads in a fresh process after the CLI's `ephemeral_startup_budget`."""
    import os
    import subprocess
    import sys

    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    if profile is not None:
        (home / "profiles.toml").write_text(profile)
    child = ("from m3po.flows.machinery import api_server; api_server.ephemeral_startup_budget(); import sys; "
             "assert 'prefect' not in sys.modules, 'prefect imported before its settings are set'; "
             "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; print(s.value())")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "-c", child], env={**base, "PREFECT_HOME": str(home), **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_the_cli_gives_the_ephemeral_api_time_to_start(tmp_path):
    # Prefect's own 20 s is shorter than a cold database's migration on 2 cores (20-28 s)
    assert _budget_prefect_sees(tmp_path, {}) == int(api_server.EPHEMERAL_STARTUP_SECONDS) > 20


def test_a_users_own_startup_budget_wins(tmp_path):
    assert _budget_prefect_sees(tmp_path, {api_server.STARTUP_SETTING: "45"}) == 45
    profile = f'active = "mine"\n[profiles.mine]\n{api_server.STARTUP_SETTING} = "50"\n'
    assert _budget_prefect_sees(tmp_path, {}, profile) == 50


def test_an_api_that_does_not_start_is_one_line_with_what_to_do(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), api_server.STARTUP_SETTING: "0"})
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--config",
                          str(Path(__file__).parent / "tiny.yaml"), "--root", str(tmp_path / "runs")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "ephemeral API server did not start within 0 s" in out.stderr and "PREFECT_API_URL" in out.stderr
    assert not (tmp_path / "runs" / "tiny" / "prompts").exists()  # nothing started
