"""Demo wall time: a fresh `m3po run` on the embedded default, each stage's share, then a cached re-run.

    python bench/demo_wall_time.py [--root DIR] [extra m3po run args...]

Prints measured figures; the target (issue: at most 10 minutes on 2 cores, a cached re-run within
a minute) is stated next to them, never asserted.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(root: str, extra: list[str]) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--root", root, *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None, help="store root (default: a fresh temporary directory)")
    args, extra = ap.parse_known_args()
    root = args.root or tempfile.mkdtemp(prefix="m3po-bench-")
    fresh = run(root, extra)
    run_dirs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("_")]
    info = json.loads((run_dirs[0] / "report_info.json").read_text())
    timings = info["timings"]
    stages_total = sum(timings.values())
    print(f"demo wall time (fresh root):           {fresh:7.1f} s   target <= 600 s  ratio {fresh / 600:.2f}")
    print(f"  flow stages sum:                      {stages_total:7.1f} s   (rest: interpreter, imports, Prefect start, report)")
    for name, sec in timings.items():
        print(f"  {name:<12} {sec:7.1f} s  {100 * sec / fresh:5.1f} % of wall time")
    cached = run(root, extra)
    print(f"cached re-run wall time:               {cached:7.1f} s   target <= 60 s   ratio {cached / 60:.2f}")
    print(f"shards recomputed on re-run: {json.loads((run_dirs[0] / 'report_info.json').read_text())['computed_shards']}")
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
