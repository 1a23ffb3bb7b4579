"""`m3po`: the command line. `m3po run` runs the whole DAG as Prefect flows and prints the report card.

Without PREFECT_API_URL, Prefect runs on its ephemeral API (no server to start); with it, the runs
show in that server's UI.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def _quiet_libraries() -> None:
    # Route our loggers into Prefect's run logs; keep library chatter out of the terminal.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "m3po")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the ephemeral server
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3po", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the M3PO pipeline end to end and print the report card")
    run.add_argument("--config", help="run configuration YAML (default: configs/demo.yaml)")
    run.add_argument("--root", default="./m3po-runs", help="object store root: a directory or an fsspec URL (s3://...)")
    run.add_argument("--run-id", default=None, help="run name under the root (default: the config's name)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a configuration key, e.g. --set sampling.n=16 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from m3po_core.config import load_config
    from m3po_core.errors import M3POError

    try:
        cfg = load_config(args.config, args.overrides)
    except M3POError as e:
        print(f"m3po: {e}", file=sys.stderr)
        return 2
    run_id = args.run_id or cfg.name
    from flows.pipeline import m3po_pipeline
    from m3po_core.report import markdown_table

    from prefect import tags

    t0 = time.time()
    try:
        with tags(f"run:{run_id}", f"config:{cfg.name}", f"strategy:{cfg.selection.strategy}"):
            result = m3po_pipeline(config=cfg.to_dict(), root=args.root, run_id=run_id)
    except M3POError as e:
        print(f"\nm3po: run {run_id!r} failed: {e}", file=sys.stderr)
        return 1
    from m3po_core.report import comparison_rows

    print("\n" + markdown_table(comparison_rows(result["metrics"])[:6]))
    p = result["pairs"]
    print(f"\npairs: {p['pairs']} of {p['groups']} prompts; mean MAS gap {p['mean_mas_gap']:.3f}, "
          f"mean log P gap {p['mean_logp_gap']:.3f}")
    print(f"report card: {result['report']}  ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
