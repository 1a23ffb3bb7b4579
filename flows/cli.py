"""`m3po`: the command line. `m3po run` runs the whole DAG as Prefect flows and prints the report card.

Without PREFECT_API_URL, Prefect runs on its ephemeral API (no server to start); with it, the runs
show in that server's UI.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings

from m3po.flows import cli_data
from m3po.flows.machinery import api_server


def _quiet_libraries() -> None:
    # Route our loggers into Prefect's run logs; keep library chatter out of the terminal.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "m3po,transformers,trl,peft,accelerate,vllm")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the ephemeral server
    # The terminal shows one progress line per stage (m3po_core/progress.py) and warnings; every log
    # line still goes to Prefect's run logs (the UI) and to the run's log file (`_run_log`).
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
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
    ipa = sub.add_parser("ipa", help="run IPA (the second method: verified against failed responses, "
                                      "collected in rounds) end to end and print its report card")
    ipa.add_argument("--config", help="run configuration YAML (default: configs/demo.yaml; its `ipa` section)")
    ipa.add_argument("--root", default="./m3po-runs")
    ipa.add_argument("--run-id", default=None, help="run name under the root (default: the config's name + '-ipa')")
    ipa.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    exp = sub.add_parser("experiment", help="the paper's tables: baselines, ablation and sweeps over seeds, "
                                            "reusing one run's cached candidates and scores")
    exp.add_argument("--config", help="run configuration YAML (default: configs/demo.yaml)")
    exp.add_argument("--root", default="./m3po-runs")
    exp.add_argument("--run-id", default=None, help="run under the root whose samples the cells share (default: the "
                                                    "config's name, so after `m3po run` nothing is sampled again)")
    exp.add_argument("--recipes", default="base,sft,dpo,rm_dpo,m3po,m3po_alpha0,ipa",
                     help="comma-separated: base, sft, dpo, rm_dpo, m3po, m3po_alpha0, ipa (default: all)")
    exp.add_argument("--seeds", default="0,1,2", help="comma-separated training/selection seeds (default 0,1,2)")
    exp.add_argument("--alphas", default="", help="alpha sweep of M3PO, e.g. 0,0.25,0.5,1 (table 5)")
    exp.add_argument("--deltas", default="", help="delta sweep of M3PO, e.g. 0,0.1,0.3 (table 6)")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rerun = sub.add_parser("rerun-failed", help="run a run again with its stored configuration: only the "
                                                 "shards and stages that are not complete are computed")
    rerun.add_argument("run_id")
    rerun.add_argument("--root", default="./m3po-runs")
    worker = sub.add_parser("worker", help="a long-lived shard worker for `execution.shards: task_worker`: takes "
                                           "sampling and scoring shards from the Prefect server, models stay loaded")
    worker.add_argument("--limit", type=int, default=1,
                        help="shards this process runs at once (default 1: one GPU, one shard at a time)")
    mk = sub.add_parser("make-ift", help="write an IFT question file (evaluation.ift_path) for a set of images: "
                                         "visual tasks with checkable constraints (m3po_core/evaluation/ift.py)")
    mk.add_argument("--images", required=True, help="image files: a directory, a glob or a text file of paths/URLs "
                                                    "(local or s3://)")
    mk.add_argument("--out", required=True, help="Parquet file to write (local or s3://)")
    mk.add_argument("--per-image", type=int, default=1, help="questions per image (default 1)")
    mk.add_argument("--constraints", type=int, default=2, help="rule constraints per question (default 2)")
    mk.add_argument("--seed", type=int, default=0)
    status = sub.add_parser("status", help="each stage's shards of a run: complete (with any candidates "
                                            "the judge left unrated), failed (with the error), running")
    status.add_argument("run_id")
    status.add_argument("--root", default="./m3po-runs")
    status.add_argument("--all", dest="show_all", action="store_true",
                        help="every failed shard and range (default: the first groups of each stage)")
    scored = sub.add_parser("score-predictions", help="score a POPE or MME predictions file (question_id, category, "
                                                      "answer, prediction) under every public harness's rule")
    scored.add_argument("file", help="Parquet, CSV or JSON Lines file, local or an fsspec URL")
    scored.add_argument("--benchmark", choices=("pope", "mme"), default=None,
                        help="which benchmark (default: told by the categories)")
    scored.add_argument("--json", action="store_true", help="print every figure as one JSON object")
    cli_data.add_parsers(sub)
    config = sub.add_parser("config", help="every configuration key with its type, default and meaning")
    config.add_argument("section", nargs="?", default=None,
                        help="one section only, e.g. sampling or data.world (default: all)")
    return p


def _config(section: str | None) -> int:
    from m3po_core.config import describe
    from m3po_core.errors import ConfigError

    try:
        text = describe(section)
    except ConfigError as e:
        print(f"m3po config: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def _status(root: str, run_id: str, show_all: bool = False) -> int:
    from m3po_core.status import status

    return status(root, run_id, show_all)


def _experiment(args) -> int:
    from m3po_core import experiment as ex
    from m3po_core.errors import M3POError

    def numbers(flag: str, text: str, kind):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise M3POError(f"{flag}: not a comma-separated list of {kind.__name__}s: {text!r}") from None

    try:
        cfg = args.cfg
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        seeds, alphas = numbers("--seeds", args.seeds, int), numbers("--alphas", args.alphas, float)
        deltas = numbers("--deltas", args.deltas, float)
        cells = ex.grid(recipes, seeds, alphas, deltas)
        if "ipa" in recipes:  # checked before any cell runs, not when the IPA cells come up
            from m3po_core.config import check_ipa

            check_ipa(cfg)
            if cfg.execution.shards not in ("in_process", "ray"):
                raise M3POError(f"recipe ipa: IPA's shards run in process or on Ray, not execution.shards="
                                f"{cfg.execution.shards!r}; leave it out (--recipes) or change the mode")
    except (M3POError, ValueError) as e:
        print(f"m3po experiment: {e}", file=sys.stderr)
        return 2
    run_id = args.run_id or cfg.name
    print(f"m3po experiment {run_id}: {len(cells)} cells (select -> train -> evaluate each)", flush=True)
    from m3po.flows.experiment import m3po_experiment
    from m3po_core import progress
    from prefect import tags

    from m3po.flows.machinery.run_log import RunLog

    run_log = RunLog(args.root, run_id, "experiment")
    progress.install(sys.stderr)
    try:
        with tags(f"run:{run_id}", f"config:{cfg.name}", "experiment"):
            result = m3po_experiment(config=cfg, root=args.root, run_id=run_id, recipes=recipes,
                                     seeds=seeds, alphas=alphas, deltas=deltas)
    except Exception as e:
        print(f"\nm3po: experiment {run_id!r} failed: {type(e).__name__}: {e} (full log: {run_log.close()})",
              file=sys.stderr)
        return 1
    finally:
        progress.uninstall()
    print("\n" + result["markdown"].split("\n", 2)[2])
    print(f"tables: {result['tables']}")
    print(f"full log: {run_log.close()}")
    return 0


def _make_ift(args) -> int:
    from m3po_core.errors import InputError
    from m3po_core.evaluation.ift import write_question_file

    try:
        n_rows, n_images = write_question_file(args.images, args.out, seed=args.seed, per_image=args.per_image,
                                               constraints_per_question=args.constraints)
    except InputError as e:
        print(f"m3po make-ift: {e}", file=sys.stderr)
        return 2
    print(f"m3po make-ift: {n_rows} questions on {n_images} images -> {args.out}")
    return 0


def _worker(limit: int) -> int:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("m3po worker: set PREFECT_API_URL to the Prefect server (or Cloud workspace) the runs use; "
              "a task worker on the ephemeral API would never receive a shard", file=sys.stderr)
        return 2
    from m3po.flows.machinery.task_worker import serve_shard_jobs
    from m3po.tasks.stage_tasks import sample_shard_job, score_shard_job

    print(f"m3po worker: serving sample and score shards from {PREFECT_API_URL.value()} "
          f"({limit} at a time); Ctrl-C to stop", flush=True)
    serve_shard_jobs(sample_shard_job, score_shard_job, limit=limit)
    return 0


def _score_predictions(args) -> int:
    import json

    from m3po_core.errors import InputError
    from m3po_core.evaluation.predictions_file import render, score_file

    try:
        result = score_file(args.file, args.benchmark)
    except InputError as e:
        print(f"m3po score-predictions: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else render(result), end="\n" if args.json else "")
    return 0


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C: no further shard starts in any thread (m3po_core.stages.runner.STOP), and the main
    thread gets its KeyboardInterrupt. Finished shards are kept; `m3po rerun-failed` resumes."""
    from m3po_core.stages.runner import STOP

    STOP.set()
    signal.default_int_handler(signum, frame)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api_server.ephemeral_startup_budget()
    _quiet_libraries()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        return _main(args)
    except KeyboardInterrupt:
        pass
    print("\nm3po: interrupted; finished shards are kept (`m3po rerun-failed RUN_ID` computes the rest)",
          file=sys.stderr)
    return 130


def check_args(args) -> None:
    """Every argument a command takes, checked before any server, worker or flow starts: an
    ArgumentError (or the configuration's ConfigError) naming it. The configuration is loaded here
    too for the commands that take one, so a bad file or override fails first."""
    from m3po_core.config import load_config
    from m3po_core.errors import ArgumentError
    from m3po_core.store import check_root, check_run_id

    if getattr(args, "root", None) is not None:
        check_root(args.root, "--root")
    if getattr(args, "run_id", None) is not None:
        check_run_id(args.run_id, "run id" if args.command in ("status", "rerun-failed", *cli_data.COMMANDS)
                     else "--run-id")
    if args.command in cli_data.COMMANDS:
        cli_data.check(args)
    if args.command == "worker" and args.limit < 1:
        raise ArgumentError(f"--limit {args.limit}: a worker runs at least one shard at a time")
    if args.command in ("run", "ipa", "experiment"):
        cfg = args.cfg = load_config(args.config, args.overrides)  # the command's one parse of it
        if args.run_id is None:  # the run id the command derives from the configuration's name
            check_run_id(cfg.name + "-ipa" if args.command == "ipa" else cfg.name, "the configuration's name")


def _main(args) -> int:
    from m3po_core.errors import M3POError

    try:
        check_args(args)
    except M3POError as e:
        print(f"m3po {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command in ("run", "ipa", "experiment", "rerun-failed") and not api_server.own_server_started():
        return 1
    return _dispatch(args)


def _dispatch(args) -> int:
    from m3po_core.config import config_from_dict
    from m3po_core.errors import M3POError
    from m3po_core.store import RunStore

    if args.command == "config":
        return _config(args.section)
    if args.command == "status":
        return _status(args.root, args.run_id, args.show_all)
    if args.command in cli_data.COMMANDS:
        return cli_data.dispatch(args)
    if args.command == "worker":
        return _worker(args.limit)
    if args.command == "make-ift":
        return _make_ift(args)
    if args.command == "score-predictions":
        return _score_predictions(args)
    if args.command == "experiment":
        return _experiment(args)
    try:
        if args.command == "rerun-failed":
            store = RunStore(args.root, args.run_id)
            if not store.exists("config.json"):
                print(f"m3po: {store.url('config.json')} not found: no run {args.run_id!r} to re-run", file=sys.stderr)
                return 2
            cfg, run_id = config_from_dict(store.read_json("config.json")), args.run_id
            method = store.read_json("method.json")["method"] if store.exists("method.json") else "m3po"
        else:
            cfg = args.cfg
            method = "ipa" if args.command == "ipa" else "m3po"
            run_id = args.run_id or (cfg.name + "-ipa" if method == "ipa" else cfg.name)
            if method == "ipa":
                from m3po_core.config import check_ipa

                check_ipa(cfg)
    except M3POError as e:
        print(f"m3po: {e}", file=sys.stderr)
        return 2
    from m3po.flows.ipa import ipa_pipeline
    from m3po.flows.pipeline import m3po_pipeline
    from m3po_core import progress
    from m3po_core.run_summary import terminal_summary

    from prefect import tags

    t0 = time.time()
    pipeline, tag = (ipa_pipeline, "method:ipa") if method == "ipa" else \
        (m3po_pipeline, f"strategy:{cfg.selection.strategy}")
    print(f"m3po {args.command} {run_id}: {RunStore(args.root, run_id).url()}", flush=True)
    from m3po.flows.machinery.run_log import RunLog

    run_log = RunLog(args.root, run_id, args.command)
    progress.install(sys.stderr)
    try:
        with tags(f"run:{run_id}", f"config:{cfg.name}", tag):
            result = pipeline(config=cfg, root=args.root, run_id=run_id)
    except Exception as e:  # Prefect has logged the traceback; end with one line naming the cause
        from m3po_core.stages.runner import STOP

        if STOP.is_set():  # a stage stopped by Ctrl-C (its shards saw the interrupt, the main thread did not)
            raise KeyboardInterrupt from e
        if "attempting to connect to ephemeral Prefect API server" in str(e):
            print(f"\nm3po: Prefect's ephemeral API server did not start within "
                  f"{os.environ.get(api_server.STARTUP_SETTING, '20')} s; raise {api_server.STARTUP_SETTING}, or start a server "
                  f"(`prefect server start`) and set PREFECT_API_URL to it (full log: {run_log.close()})", file=sys.stderr)
            return 1
        kind = "" if isinstance(e, M3POError) else f"{type(e).__name__}: "
        print(f"\nm3po: run {run_id!r} failed: {kind}{e}\n(see `m3po status {run_id} --root {args.root}`; "
              f"full log: {run_log.close()})", file=sys.stderr)
        return 1
    finally:
        progress.uninstall()
    print("\n" + "\n".join(terminal_summary(result, method)))
    print(f"report card: {result['report']}  ({time.time() - t0:.0f}s)")
    print(f"full log: {run_log.close()}")
    return 0


def entrypoint() -> None:
    """The `m3po` console script: `main`, then an exit past the C++ teardown (flows/machinery/process_exit.py)."""
    from m3po.flows.machinery.process_exit import exit_now

    exit_now(main())


if __name__ == "__main__":
    entrypoint()
