"""First runs on a fresh machine: does Prefect's ephemeral API come up?

Each try starts a one-task flow on the ephemeral API with a new, empty PREFECT_HOME (so the server
creates and migrates its database first, as on a fresh machine), in a fresh process, with the
start-up budget `m3po` gives it (flows/machinery/api_server.py `ephemeral_startup_budget`), and, for contrast, with
Prefect's own default (20 s). Prints each try's outcome and wall time, the count that got past the
API's start, and as its last line one JSON object. Asserts nothing; run it on an otherwise idle machine.

    python bench/first_runs.py [--tries 10] [--default-tries 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys
budget = sys.argv[1] == "m3po"
if budget:
    from m3po.flows.machinery.api_server import ephemeral_startup_budget
    ephemeral_startup_budget()
from prefect import flow, task

@task
def one():
    return 1

@flow
def first_run():
    return one()

assert first_run() == 1
"""


def try_once(mode: str) -> tuple[bool, float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": tempfile.mkdtemp(prefix="m3po-first-run-"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if "Error" in line or "Timed out" in line]
    why = "" if out.returncode == 0 else (errors or out.stderr.strip().splitlines() or ["?"])[-1][:160]
    return out.returncode == 0, time.time() - t0, why


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tries", type=int, default=10, help="first runs with m3po's start-up budget")
    ap.add_argument("--default-tries", type=int, default=5, help="first runs with Prefect's default budget")
    args = ap.parse_args()
    result = {}
    for mode, tries in (("m3po", args.tries), ("prefect-default", args.default_tries)):
        ok = 0
        for i in range(tries):
            passed, wall, why = try_once(mode)
            ok += passed
            print(f"{mode:<16} try {i + 1:2d}: {'started' if passed else 'FAILED'} in {wall:5.1f} s {why}", flush=True)
        print(f"{mode}: {ok} of {tries} first runs got past the API's start")
        result[mode] = {"started": ok, "tries": tries}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
