"""Rebuild the models the repository carries (stages/carried.py), once per demo world, after a
change to the world, the warm start or their cache keys:

    python -m m3po_core.stages.build_carried                                   # configs/demo.yaml
    python -m m3po_core.stages.build_carried --set data.world.answer_bias=0    # its control world

Each builds the configuration's base and CLIP in a fresh store, as a run without a carried copy
would, and copies them into m3po_core/assets/ with their checksums; commit the result. Limit: the
models are trained on this machine, so a rebuild elsewhere gives other bytes and other demo figures
(bench/demo_figures.py refreshes them).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from m3po_core.stages.carried import carry


def build(config_path: str | None = None, overrides: list[str] = ()) -> list[Path]:
    """Build the configuration's base and CLIP in a fresh store and copy them into ASSETS."""
    from m3po_core.config import load_config
    from m3po_core.stages.base_models import ensure_base_model, ensure_clip
    from m3po_core.store import RunStore

    cfg = load_config(config_path, list(overrides))
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp, cfg.name)
        for ref in (ensure_base_model(cfg, store, print, use_carried=False),
                    ensure_clip(cfg, store, print, use_carried=False)):
            target = carry(Path(tmp) / "_models" / Path(ref).name)
            written.append(target)
            print(f"carried: {target}")
    return written


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m m3po_core.stages.build_carried", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="run configuration YAML (default: configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from m3po_core.errors import M3POError

    try:
        build(args.config, args.overrides)
    except M3POError as e:  # a bad configuration file or key: one line naming it
        sys.exit(f"build_carried: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
