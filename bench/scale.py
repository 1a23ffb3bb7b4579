"""How each stage's host memory and time grow with the number of prompts: the pipeline's own cost.

    python bench/scale.py --quick            # 100, 200, 400 prompts (8.5-10 minutes on 2 cores)
    python bench/scale.py                    # 1000, 4000, 16000 prompts
    python bench/scale.py --sizes 1000,2000

For each size it writes LLaVA-Instruct-150K-format data (COCO-sized 640x480 JPEGs, one conversation
record per image) and runs every DAG step over it in a process of its own: prompts (with the
quality filter reading every image), sample, score, select, train, evaluate, report. The models are
the tiny ones carried for the demo (what is measured is the pipeline's handling, not a 7B model's
compute); the sampler and the judge are an OpenAI-compatible server on loopback
(tests/openai_server.py) that returns 32 candidates of ~150 tokens per prompt and one rating
request per prompt (`scoring.judge_candidates_per_call=32`), so sampling and scoring go through the
real backends, their retries and their shard writes. Evaluation answers a fixed 40-question POPE
file at every size.

Per stage and size it prints the wall time of the stage call and the process's peak resident
memory (ru_maxrss, imports included), then the growth exponents: the least-squares slope of log
value against log prompts (1 = linear, 0 = flat). Its last line is one JSON object:
{"memory_exponent": {stage: x}, "time_exponent": {stage: y}, "sizes": [...], "rows": [...]}.
Asserts nothing: it measures.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prompts", "sample", "score", "select", "train", "evaluate", "report")
N_CANDIDATES, TOKENS = 32, 150
WORDS = ("the", "a", "red", "bus", "is", "on", "street", "near", "two", "people", "with", "blue", "sky", "and",
         "tree", "car", "parked", "left", "of", "building", "there", "image", "shows", "large", "white")


def write_data(directory: Path, n: int, seed: int = 0) -> None:
    """n COCO-named 640x480 JPEGs and LLaVA-Instruct's JSON records over them, plus a small POPE file."""
    from PIL import Image, ImageDraw

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    images = directory / "train2017"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"{i:012d}.jpg"
        img = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(4):  # a few shapes: a JPEG of COCO's size and roughly its entropy
            x, y = rng.randrange(560), rng.randrange(400)
            draw.rectangle([x, y, x + rng.randrange(20, 80), y + rng.randrange(20, 80)],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(images / name, format="JPEG", quality=85)
        question = rng.choice(["What is in the image?", "Describe the scene in detail.", "What colour is the bus?",
                               "Where are the people standing?"])
        records.append({"id": name[:-4], "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question} ({i})"},
            {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(40))}]})
    (directory / "llava_instruct.json").write_text(json.dumps(records))
    rows = []
    for i in range(20):  # POPE: 40 questions on 20 small images, the same at every size
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (rng.randrange(256),) * 3).save(buf, format="PNG")
        for obj, answer in (("bus", "yes"), ("dog", "no")):
            rows.append({"question_id": f"{i}-{obj}", "question": f"Is there a {obj} in the image?", "answer": answer,
                         "image": {"bytes": buf.getvalue(), "path": None}, "category": "random"})
    pq.write_table(pa.Table.from_pylist(rows), directory / "pope.parquet")


def overrides(data: Path, base_url: str) -> list[str]:
    return [f"data.source=llava_instruct", f"data.path={data / 'llava_instruct.json'}",
            f"data.image_root={data / 'train2017'}", "data.shard_size=64",
            "sampling.backend=openai", f"sampling.base_url={base_url}", f"sampling.n={N_CANDIDATES}",
            f"sampling.max_new_tokens={TOKENS + 10}", "sampling.contrastive_n=0",
            "scoring.judge=openai:scale-judge", f"scoring.judge_base_url={base_url}",
            f"scoring.judge_candidates_per_call={N_CANDIDATES}",
            "evaluation.benchmarks=[pope]", f"evaluation.pope_path={data / 'pope.parquet'}",
            "evaluation.backend=transformers", "training.epochs=1"]


def serve(vocab: int):
    """The loopback server: sampling requests get 32 choices of ~150 token ids, rating requests
    hashed 1-10 ratings for every candidate of the request."""
    sys.path.insert(0, str(REPO / "tests"))
    import re

    from openai_server import FakeOpenAIServer, Reply, request_text

    def respond(body: dict) -> list:
        server.requests.clear()  # the recording is for tests; at 16K prompts it would hold gigabytes of images
        if body.get("logprobs"):  # a sampling request
            rng = random.Random(zlib.crc32(json.dumps(body["messages"][-1]["content"][-1]).encode()))
            out = []
            for _ in range(int(body.get("n") or 1)):
                n = rng.randrange(TOKENS - 30, TOKENS + 10)
                ids = [rng.randrange(5, vocab) for _ in range(n)]
                out.append(Reply(" ".join(rng.choice(WORDS) for _ in range(n // 2)),
                                 tokens=[(f"token_id:{t}", -rng.random() * 3) for t in ids], finish_reason="stop"))
            return out
        text = request_text(body)
        ids = [int(i) for i in re.findall(r"\n\n\[(\d+)\]\n", text)] or [0]
        ratings = [{"id": i, **{a: 1 + zlib.crc32(f"{text[-40:]}{i}{a}".encode()) % 10
                                for a in ("relevance", "accuracy", "adherence")}}
                   for i in ids]
        return [Reply(json.dumps({"ratings": ratings} if len(ids) > 1 else
                                 {k: v for k, v in ratings[0].items() if k != "id"}))]

    server = FakeOpenAIServer(respond)
    return server.start()


def child(stage: str, root: str, config_json: str) -> None:
    """One stage in this process; prints {"seconds", "peak_rss_mb", "rss_before_mb"}."""
    from m3po_core.config import config_from_dict
    from m3po_core.stages import base_models, evaluate, prompts, sample, score, select, train
    from m3po_core.store import RunStore

    cfg = config_from_dict(json.loads(config_json))
    store = RunStore(root, "scale")
    model_ref = base_models.ensure_base_model(cfg, store)
    clip_ref = base_models.ensure_clip(cfg, store)
    n_shards = len(store.manifest("prompts")) if stage != "prompts" else 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    if stage == "prompts":
        prompts.prepare_prompts(cfg, store)
    elif stage in ("sample", "score"):
        for shard in range(n_shards):
            (sample.sample_shard(cfg, store, shard, model_ref) if stage == "sample"
             else score.score_shard(cfg, store, shard, clip_ref))
    elif stage == "select":
        select.select(cfg, store, n_shards)
    elif stage == "train":
        train.train(cfg, store, model_ref)
    elif stage == "evaluate":
        evaluate.evaluate(cfg, store, model_ref)
    elif stage == "report":
        from m3po_core.report import build_report

        build_report(cfg, store, n_shards, {})
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before}))


def slope(xs: list[float], ys: list[float]) -> float | None:
    """The log-log least-squares slope; None with fewer than two sizes."""
    if len(set(xs)) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100, 200 and 400 prompts")
    p.add_argument("--sizes", default=None, help="comma-separated prompt counts (default 1000,4000,16000)")
    p.add_argument("--work", default=None, help="folder for the data and the stores (default: a temporary one)")
    args = p.parse_args()
    sizes = [int(s) for s in (args.sizes or ("100,200,400" if args.quick else "1000,4000,16000")).split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="m3po-scale-"))
    from m3po_core.config import load_config

    vocab = json.loads(next((REPO / "m3po_core" / "assets").glob("tiny-llava-*/config.json")).read_text())
    vocab = vocab.get("text_config", vocab)["vocab_size"]
    server = serve(vocab)
    env = {**os.environ, "OPENAI_API_KEY": "sk-scale-bench", "PREFECT_LOGGING_LEVEL": "WARNING"}
    rows = []
    try:
        for n in sizes:
            data = work / f"data-{n}"
            if not (data / "llava_instruct.json").exists():
                t0 = time.time()
                write_data(data, n)
                print(f"# {n} prompts: data written in {time.time() - t0:.0f}s", flush=True)
            cfg = load_config(REPO / "configs" / "demo.yaml", overrides(data, server.base_url))
            root = str(work / f"runs-{n}")
            for stage in STAGES:
                out = subprocess.run([sys.executable, __file__, "_stage", stage, root, json.dumps(cfg.to_dict())],
                                     env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{stage} at {n} prompts failed:\n{out.stderr[-3000:]}")
                m = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"prompts": n, "stage": stage, "seconds": round(m["seconds"], 2),
                       "peak_rss_mb": round(m["peak_rss_mb"], 1), "rss_before_mb": round(m["rss_before_mb"], 1)}
                rows.append(row)
                print(f"{n:>6} prompts  {stage:<9} {row['seconds']:>8.1f} s  peak RSS {row['peak_rss_mb']:>7.0f} MB "
                      f"(before the stage {row['rss_before_mb']:.0f} MB)", flush=True)
    finally:
        server.stop()
    result = {"sizes": sizes, "memory_exponent": {}, "time_exponent": {}}
    for stage in STAGES:
        got = [r for r in rows if r["stage"] == stage]
        for key, field in (("memory_exponent", "peak_rss_mb"), ("time_exponent", "seconds")):
            x = slope([r["prompts"] for r in got], [r[field] for r in got])
            result[key][stage] = None if x is None else round(x, 3)
    print("stage      memory exponent  time exponent")
    for stage in STAGES:
        m, t = result["memory_exponent"][stage], result["time_exponent"][stage]
        print(f"{stage:<10} {'-' if m is None else f'{m:.3f}':>15}  {'-' if t is None else f'{t:.3f}':>13}")
    result["rows"] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_stage":
        child(*sys.argv[2:5])
    else:
        main()
