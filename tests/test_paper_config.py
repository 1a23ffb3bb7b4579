"""The LLaVA-1.5 walkthrough (docs/llava15.md), command for command, on stand-ins of every input it names.

`configs/llava15-7b.yaml` is run through the CLI exactly as docs/llava15.md's "LLaVA-1.5: the paper's
setting" section tells a user to, with inputs in the real releases' layouts (tests/llava_release.py:
a llava-hf model directory with a Llama tokenizer, LLaVA-Instruct-150K's JSON on COCO-named JPEGs,
lmms-lab's POPE and MME Parquet, an open_clip ViT-L-14 checkpoint file, an IFT file from
`m3po make-ift`) and the judge on a loopback server speaking OpenAI's protocol. What differs from
a GPU machine is set on the command line and nowhere else: the transformers sampler instead of
vLLM (no CUDA here), fewer, shorter candidates (a ViT-L/14 on two CPU cores) and no warm-up for the
stand-in's single optimizer step.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llava_release import write_release
from openai_server import FakeOpenAIServer, Reply, request_text

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-paper-config-SECRET"
# The stand-in's few pairs make one optimizer step, which warm-up would take at learning rate 0: the
# adapter would stay zero and evaluation's adapter check rightly refuse it (AdapterNoOp).
CPU_ONLY = ["sampling.backend=transformers", "sampling.n=8", "sampling.max_new_tokens=24", "training.warmup_ratio=0"]


def hashed_rating(text: str, axis: str) -> int:
    """A judge double: a fixed 1-10 rating per (response, axis), so reruns see the same scores."""
    return 1 + int(hashlib.sha256(f"{axis}:{text.strip()}".encode()).hexdigest(), 16) % 10


def rubric_judge(body: dict) -> list[Reply]:
    text = request_text(body)
    if "Responses (" in text:  # several candidates of one prompt: "[i]\n<response>" blocks
        blocks = re.split(r"\n\n\[(\d+)\]\n", text.split("rate each one independently):", 1)[1])
        responses = {int(blocks[i]): blocks[i + 1].split("\n\nReply with JSON")[0]
                     for i in range(1, len(blocks) - 1, 2)}
        ratings = [{"id": i, **{a: hashed_rating(r, a) for a in ("relevance", "accuracy", "adherence")}}
                   for i, r in responses.items()]
        return [Reply(content=json.dumps({"ratings": ratings}))]
    response = text.split("Response:\n", 1)[1].split("\n\nReply with JSON")[0]
    return [Reply(content=json.dumps({a: hashed_rating(response, a) for a in ("relevance", "accuracy", "adherence")}))]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def judge():
    server = FakeOpenAIServer(rubric_judge).start()
    yield server
    server.stop()


def m3po(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    return subprocess.run([sys.executable, "-m", "m3po.flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="module")
def paper_run(release, judge, tmp_path_factory):
    work = tmp_path_factory.mktemp("runs")
    ift = work / "ift.parquet"
    made = m3po("make-ift", "--images", str(release.eval_images), "--out", str(ift), "--per-image", "1")
    assert made.returncode == 0, made.stderr[-3000:]
    readme_flags = [f"model.name={release.model}", f"data.path={release.instruct_json}",
                    f"data.image_root={release.train_images}", f"evaluation.pope_path={release.pope}",
                    f"evaluation.mme_path={release.mme}", f"evaluation.ift_path={ift}",
                    f"scoring.clip.pretrained={release.clip_checkpoint}", f"scoring.judge_base_url={judge.base_url}"]
    args = ["run", "--config", "configs/llava15-7b.yaml", "--root", str(work / "m3po-runs")]
    for flag in readme_flags + CPU_ONLY:
        args += ["--set", flag]
    out = m3po(*args)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return work / "m3po-runs" / "llava15-7b", args, out


def test_the_paper_config_runs_every_stage_on_release_formats(paper_run, release, judge):
    run, _, out = paper_run
    assert "| POPE accuracy |" in out.stdout and (run / "report.md").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    for model in ("base", "trained"):
        assert metrics[model]["pope"]["n"] == 24 and set(metrics[model]["pope"]["per_category"]) == {
            "adversarial", "popular", "random"}
        assert set(metrics[model]["mme"]["categories"]) == {"color", "existence"}
        assert metrics[model]["ift"]["n"] == 4 and metrics[model]["ift"]["unrated"] == 0

    # one prompt per conversation (turns: first), N candidates each, sampled with the Llama tokenizer
    prompts = pq.read_table(run / "prompts").to_pylist()
    assert sorted(p["prompt_id"] for p in prompts) == sorted(f"{100000 + 7 * i:012d}-t0" for i in range(6))
    cands = pq.read_table(run / "candidates").to_pylist()
    assert len(cands) == 6 * 8 and {c["sampler"] for c in cands} == {"transformers"}
    assert all(c["n_tokens"] == len(c["token_ids"]) <= 24 and c["logp_sum"] < 0 for c in cands)

    # MAS from the ViT-L-14 checkpoint and the judge: every candidate rated, the image sent as a data URL
    scores = pq.read_table(run / "scores").to_pylist()
    assert len(scores) == len(cands) and all(
        -1 <= s["clip"] <= 1 and 0 <= s["judge"] <= 1 and 0 <= s["mas"] <= 1 for s in scores)  # NaN fails
    rubric = [r for r in judge.requests if "Responses (" in r.text]
    assert rubric and all(r.body["model"] == "gpt-4o" and r.image_urls[0].startswith("data:image/png;base64,")
                          for r in rubric)
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in judge.requests)

    # eq. 1-3 pairs, LoRA-DPO adapter on the language model
    pairs = pq.read_table(run / "pairs.parquet").to_pylist()
    assert pairs and all(p["strategy"] == "m3po" and p["mas_chosen"] > p["mas_rejected"] for p in pairs)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 16

    # the key is in no file the run wrote
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_candidates_hold_the_tokens_training_feeds(paper_run, release):
    """The pairs carry the sampler's own ids (what the DPO collator feeds): they decode, under the
    Llama tokenizer, to the stored text and hold neither BOS nor image placeholders (the prompt's)."""
    from transformers import AutoProcessor

    run, _, _ = paper_run
    tok = AutoProcessor.from_pretrained(str(release.model)).tokenizer
    pairs = pq.read_table(run / "pairs.parquet").to_pylist()
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_token_ids"]
            assert tok.decode(ids, skip_special_tokens=True).strip() == p[side]
            assert tok.bos_token_id not in ids and tok.convert_tokens_to_ids("<image>") not in ids


def test_the_same_command_again_recomputes_nothing_and_asks_the_judge_nothing(paper_run, judge):
    run, args, _ = paper_run
    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
    asked = len(judge.requests)
    out = m3po(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "report_info.json").read_text())["computed_shards"] == {"candidates": 0, "scores": 0}
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")} == stamp
    assert len(judge.requests) == asked
