"""`m3po view` and `m3po export`: look at a run's data in a browser, and take its pairs elsewhere.
Neither starts a Prefect API nor writes to the run's store.
"""
from __future__ import annotations

import dataclasses
import sys

COMMANDS = ("view", "export")


def add_parsers(sub) -> None:
    from m3po_core.export import FORMATS
    from m3po_core.pair_query import PairFilter

    view = sub.add_parser("view", help="a read-only web viewer of a run: its shards, pairs, candidate pools and "
                                       "benchmark answers, on loopback")
    view.add_argument("run_id")
    view.add_argument("--root", default="./m3po-runs", help="the run's store root (a directory or s3://...)")
    view.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default loopback: only this machine; another exposes the run's data)")
    view.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    export = sub.add_parser("export", help="the run's pairs with their images as TRL / datasets / LLaMA-Factory data")
    export.add_argument("run_id")
    export.add_argument("--root", default="./m3po-runs", help="the run's store root (a directory or s3://...)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="trl: Parquet in TRL's vision preference format; hf-dataset: a `datasets` folder "
                             "(load_from_disk); llamafactory: sharegpt preference JSON + dataset_info.json")
    export.add_argument("--out", required=True, help="a new (or empty) local directory")
    for f in dataclasses.fields(PairFilter):  # the viewer's filter, option for option
        export.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=f.metadata["help"])


def check(args) -> None:
    from m3po_core.errors import ArgumentError

    if args.command == "view" and not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port {args.port}: not a TCP port (0-65535)")


def dispatch(args) -> int:
    from m3po_core.errors import M3POError

    try:
        return _view(args) if args.command == "view" else _export(args)
    except M3POError as e:
        print(f"m3po {args.command}: {e}", file=sys.stderr)
        return 2


def _view(args) -> int:
    import socket

    import uvicorn

    from m3po_core.viewer.app import create_app

    app = create_app(args.root, args.run_id)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(128)  # connections queue from here on: the address printed below answers at once
    except OSError as e:
        print(f"m3po view: cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port",
              file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"m3po view: listening on {host}, not loopback: anyone who reaches it reads this run", file=sys.stderr)
    print(f"m3po view {args.run_id}: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/  (Ctrl-C stops it)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0


def _export(args) -> int:
    from m3po_core.export import export_pairs
    from m3po_core.pair_query import PairFilter
    from m3po_core.store import RunStore

    flt = PairFilter.from_mapping(vars(args), where="m3po export")
    store = RunStore(args.root, args.run_id)

    def shown(done: int, total: int) -> None:
        print(f"\rexport  {done:,}/{total:,} pairs", end="", file=sys.stderr, flush=True)

    result = export_pairs(store, args.format, args.out, flt, on_progress=shown)
    print(file=sys.stderr)
    print(f"m3po export {args.run_id}: {result['rows']:,} pairs ({args.format}) in {result['out']}")
    return 0
