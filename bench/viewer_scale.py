"""`m3po view` on a store of the paper's size: 150K pairs (LLaVA-Instruct-150K's prompts, one pair
each), in headless Chromium. Measures the time from the command's start to its first answer (the
pair index is built then), and in the browser the first page of pairs (the load event: the HTML and
its 50 thumbnails) and each change a user makes: a filter, the next page, a sort, a prompt's pool.

    python bench/viewer_scale.py                 # 150,000 pairs
    python bench/viewer_scale.py --pairs 20000   # a quick check

The store is written by this script with the project's own writers (`RunStore.publish_shard` for
2,344 prompts shards of 64, `RunStore.write_table` for pairs.parquet in its row groups, candidates
and scores shards for the pool's prompt): rows of the real schemas with ~150-token answers, their
images 64 distinct 640x480 JPEGs. Asserts nothing: it measures. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WORDS = ("a the person is holding red blue green small large dog cat car street table window sitting next to "
         "standing on near behind front of image shows there are two three people white black wooden").split()


def build_store(root: Path, n_pairs: int, shard_size: int = 64) -> None:
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from m3po_core import schema
    from m3po_core.config import load_config
    from m3po_core.store import RunStore

    rng = np.random.default_rng(0)
    images = []
    for i in range(64):
        pixels = (rng.random((480, 640, 3)) * 40 + [i * 3 % 255, 120, 200 - i * 2]).clip(0, 255).astype("uint8")
        path = root / "images" / f"{i:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=85)
        images.append(str(path))
    store = RunStore(str(root), "big")
    store.write_json("config.json", load_config(REPO / "configs" / "demo.yaml").to_dict())
    ids = [f"{i:012d}-t0" for i in range(n_pairs)]
    kinds = ["conversation", "detail", "complex_reasoning"]
    n_shards = -(-n_pairs // shard_size)
    for s in range(n_shards):
        rows = range(s * shard_size, min(n_pairs, (s + 1) * shard_size))
        table = pa.table({"prompt_id": [ids[i] for i in rows], "image": [images[i % 64] for i in rows],
                          "instruction": [f"What is happening in image {i}?" for i in rows],
                          "reference": [""] * len(rows), "kind": [kinds[i % 3] for i in rows],
                          "source": ["llava_instruct_150k"] * len(rows), "scene": [""] * len(rows),
                          "image_sha256": [""] * len(rows)})
        store.publish_shard("prompts", s, table, schema.PROMPTS, "bench")
    store.write_json("prompts/_stage.json", {"n_shards": n_shards, "n_prompts": n_pairs, "key": "bench"})
    vocab = np.array(WORDS)

    def answers(n: int) -> list[str]:
        return [" ".join(vocab[rng.integers(0, len(vocab), 110)]) for _ in range(n)]

    mas_c, mas_r = rng.random(n_pairs) * 0.5 + 0.5, rng.random(n_pairs) * 0.5
    logp_c, logp_r = -rng.random(n_pairs), -rng.random(n_pairs)
    tokens = pa.array([rng.integers(3, 32000, 150, dtype="int32") for _ in range(n_pairs)], pa.list_(pa.int32()))
    pairs = pa.table({"prompt_id": ids, "image": [images[i % 64] for i in range(n_pairs)],
                      "instruction": [f"What is happening in image {i}?" for i in range(n_pairs)],
                      "chosen": answers(n_pairs), "rejected": answers(n_pairs),
                      "chosen_idx": pa.array(rng.integers(0, 32, n_pairs), pa.int32()),
                      "rejected_idx": pa.array(rng.integers(0, 32, n_pairs), pa.int32()),
                      "chosen_token_ids": tokens, "rejected_token_ids": tokens,
                      "mas_chosen": mas_c, "mas_rejected": mas_r, "logp_chosen": logp_c, "logp_rejected": logp_r,
                      "m3p_score": mas_r * 0.5 + np.exp(logp_r) * 0.5, "strategy": ["m3po"] * n_pairs})
    store.write_table("pairs.parquet", pairs, schema.PAIRS, row_group_size=schema.PAIRS_ROW_GROUP)
    # the first prompts shard's candidates and scores, for the pool page (32 each)
    first = [ids[i] for i in range(min(shard_size, n_pairs))]
    cands = pa.table({"prompt_id": [p for p in first for _ in range(32)], "cand_idx": pa.array(list(range(32)) * len(first), pa.int32()),
                      "text": answers(32 * len(first)), "token_ids": pa.array([[1, 2, 3]] * 32 * len(first), pa.list_(pa.int32())),
                      "logp_sum": -rng.random(32 * len(first)) * 100, "logp_mean": -rng.random(32 * len(first)),
                      "n_tokens": pa.array([150] * 32 * len(first), pa.int32()), "finish_reason": ["stop"] * 32 * len(first),
                      "sampler": ["bench"] * 32 * len(first), "seed": [0] * 32 * len(first), "perturbation": [""] * 32 * len(first)})
    store.publish_shard("candidates", 0, cands, schema.CANDIDATES, "bench")
    n = cands.num_rows
    scores = pa.table({"prompt_id": cands.column("prompt_id"), "cand_idx": cands.column("cand_idx"),
                       **{c: rng.random(n) for c in ("clip", "judge", "judge_relevance", "judge_accuracy",
                                                    "judge_adherence", "mas")}})
    store.publish_shard("scores", 0, scores, schema.SCORES, "bench")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=150_000)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="m3po-viewer-scale-") as tmp:
        t0 = time.time()
        build_store(Path(tmp), args.pairs)
        print(f"# store of {args.pairs:,} pairs written in {time.time() - t0:.0f}s", flush=True)
        t0 = time.time()
        server = subprocess.Popen([sys.executable, "-m", "m3po.flows.cli", "view", "big", "--root", tmp, "--port", "0"],
                                  stdout=subprocess.PIPE, text=True)
        figures: dict[str, float] = {}
        try:
            url = re.search(r"(http://127\.0\.0\.1:\d+)/", server.stdout.readline()).group(1)
            figures["start_s"] = time.time() - t0
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page()

                def timed(name: str, action) -> None:
                    t = time.time()
                    action()
                    page.wait_for_load_state("load")
                    figures[name] = time.time() - t
                    print(f"{name:<16} {figures[name]:6.2f} s   {page.locator('#count').inner_text() if page.locator('#count').count() else page.url}", flush=True)

                timed("first_page_s", lambda: page.goto(f"{url}/pairs"))
                timed("filter_s", lambda: (page.fill("input[name=min_mas_gap]", "0.3"), page.select_option("select[name=kind]", "detail"), page.click("#apply")))
                timed("next_page_s", lambda: page.locator("a.next").first.click())
                timed("sort_s", lambda: page.goto(f"{url}/pairs?sort=m3p_score&desc=1&kind=detail&min_mas_gap=0.3"))
                timed("text_filter_s", lambda: page.goto(f"{url}/pairs?text=image%20{args.pairs // 2}"))
                timed("pool_s", lambda: page.goto(f"{url}/pool/{0:012d}-t0"))
                timed("scatter_s", lambda: page.goto(f"{url}/scatter"))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({"pairs": args.pairs, **{k: round(v, 3) for k, v in figures.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
