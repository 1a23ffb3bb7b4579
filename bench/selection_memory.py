"""Peak memory of the select stage: shard by shard (the pipeline's) against every candidate at once.

    python bench/selection_memory.py [--prompts 4000] [--n 32] [--tokens 150] [--shard-size 64]

Writes a run's prompts / candidates / scores shards with random content at the given scale (the
paper's: 150K prompts x 32 candidates of ~150 tokens; the defaults are a slice of it), then runs in
fresh processes (a) `select.select`, which reads, selects and keeps one shard at a time, and (b) the
all-at-once baseline it replaced: every candidate with its scores in one table, plus a Python
lookup of every text and token list. Prints each one's peak resident memory above the process's
start and their ratio, and checks that both give the same pairs. Asserts nothing.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_run(root: str, prompts: int, n: int, tokens: int, shard_size: int) -> int:
    import numpy as np
    import pyarrow as pa

    from m3po_core import schema
    from m3po_core.store import RunStore

    store = RunStore(root, "bench")
    rng = np.random.default_rng(0)
    shards = -(-prompts // shard_size)
    for s in range(shards):
        ids = [f"p{i:07d}" for i in range(s * shard_size, min(prompts, (s + 1) * shard_size))]
        store.publish_shard("prompts", s, pa.table({
            "prompt_id": ids, "image": [f"/data/coco/{p}.jpg" for p in ids], "instruction": ["Describe it."] * len(ids),
            "reference": [None] * len(ids), "kind": ["open"] * len(ids), "source": ["bench"] * len(ids),
            "scene": [None] * len(ids), "image_sha256": [f"{i:064x}" for i in range(len(ids))]}),
            schema.PROMPTS, key="bench")
        rows = len(ids) * n
        lengths = rng.integers(tokens // 2, tokens * 3 // 2, rows)
        token_ids = [rng.integers(3, 32000, k).tolist() for k in lengths]
        logp = rng.normal(-1.0, 0.3, rows)
        store.publish_shard("candidates", s, pa.table({
            "prompt_id": np.repeat(ids, n).tolist(), "cand_idx": np.tile(np.arange(n), len(ids)).tolist(),
            "text": [" ".join(f"w{t}" for t in ids_) for ids_ in token_ids], "token_ids": token_ids,
            "logp_sum": logp * lengths, "logp_mean": logp, "n_tokens": lengths.tolist(),
            "finish_reason": ["stop"] * rows, "sampler": ["bench"] * rows, "seed": [0] * rows,
            "perturbation": [""] * rows}), schema.CANDIDATES, key="bench")
        judge = rng.random(rows)
        store.publish_shard("scores", s, pa.table({
            "prompt_id": np.repeat(ids, n).tolist(), "cand_idx": np.tile(np.arange(n), len(ids)).tolist(),
            "clip": rng.random(rows), "judge": judge, "judge_relevance": judge, "judge_accuracy": judge,
            "judge_adherence": judge, "mas": 0.2 * rng.random(rows) + 0.8 * judge}), schema.SCORES, key="bench")
    return shards


def all_at_once(store, cfg, shards: int):
    """The select stage before it went shard by shard (for the baseline only)."""
    from m3po_core.selection import select_pairs
    from m3po_core.stages.select import candidates_with_scores

    table = candidates_with_scores(store, shards)
    pairs, _ = select_pairs(table.append_column("logp", table.column(cfg.selection.logp)))
    by_key = {(p, c): (t, ids) for p, c, t, ids in zip(*(table.column(k).to_pylist() for k in
                                                          ("prompt_id", "cand_idx", "text", "token_ids")))}
    return [by_key[(p, c)][0] for p, c in zip(pairs.column("prompt_id").to_pylist(),
                                              pairs.column("chosen_idx").to_pylist())]


def child(root: str, shards: int, mode: str) -> None:
    from m3po_core.stages import select
    from m3po_core.config import RunConfig
    from m3po_core.store import RunStore

    store, cfg = RunStore(root, "bench"), RunConfig()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "shards":
        select.select(cfg, store, shards)
        chosen = store.read_table("pairs.parquet").sort_by("prompt_id").column("chosen").to_pylist()
    else:
        chosen = all_at_once(store, cfg, shards)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak - start) / 1024, "chosen_digest": hash(tuple(chosen))}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4000)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    with tempfile.TemporaryDirectory() as root:
        shards = write_run(root, args.prompts, args.n, args.tokens, args.shard_size)
        print(f"{args.prompts} prompts x {args.n} candidates (~{args.tokens} tokens) in {shards} shards")
        out = {}
        for mode in ("all_at_once", "shards"):
            run = subprocess.run([sys.executable, __file__, "--child", root, str(shards), mode],
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"  {mode:12s} peak memory above start: {out[mode]['peak_mib']:8.0f} MiB")
        print(f"  same pairs: {out['shards']['chosen_digest'] == out['all_at_once']['chosen_digest']}")
        print(f"  all-at-once / shard-by-shard peak memory: "
              f"{out['all_at_once']['peak_mib'] / max(out['shards']['peak_mib'], 1):.1f}x")


if __name__ == "__main__":
    main()
