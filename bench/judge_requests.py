"""Judge requests per candidate, one candidate per call against several.

    python bench/judge_requests.py [--prompts 16] [--n 32] [--per-call 1,4,8,16,32]

Rates P prompts x N candidates with the OpenAI-compatible judge against the project's loopback
chat-completions server (tests/openai_server.py: real HTTP, the openai client's own parsing) and
prints, per setting of `scoring.judge_candidates_per_call`, the requests and the prompt tokens per
candidate as the server reports them (its token count is a word count plus 100 per request, a
stand-in for the instruction, rubric and image every request repeats). Asserts nothing.
"""
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def responder(body):
    """A judge that rates every response it is shown (JSON in the rubric's format)."""
    from openai_server import Reply, request_text

    text = request_text(body)
    if "Responses (" in text:
        n = text.count("candidate answer")
        k = max(1, sum(1 for line in text.splitlines() if line.strip().startswith("[") and "]" in line[:6]))
        ratings = [{"id": i, "relevance": 7, "accuracy": 6, "adherence": 8} for i in range(1, max(n, k) + 1)]
        return [Reply(content=json.dumps({"ratings": ratings}))]
    return [Reply(content=json.dumps({"relevance": 7, "accuracy": 6, "adherence": 8}))]


def main() -> None:
    import argparse

    from PIL import Image

    from m3po_core.scoring.judge import JudgeItem
    from m3po_core.scoring.openai_judge import OpenAIJudge
    from openai_server import FakeOpenAIServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--per-call", default="1,4,8,16,32")
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    server = FakeOpenAIServer(responder).start()
    items = [JudgeItem(prompt_id=f"p{p}", instruction=f"Describe image {p}.", response=f"answer {k} to prompt {p}",
                       image=Image.new("RGB", (32, 32), (p * 13 % 255, 80, 160)))
             for p in range(args.prompts) for k in range(args.n)]
    cands = len(items)
    print(f"{args.prompts} prompts x {args.n} candidates = {cands}")
    print("per call | requests | requests/candidate | prompt tokens/candidate | unrated | seconds")
    try:
        for per_call in [int(x) for x in args.per_call.split(",")]:
            judge = OpenAIJudge("judge-bench", base_url=server.base_url, candidates_per_call=per_call,
                                concurrency=8, max_retries=2, backoff_base=0.01, backoff_max=0.05)
            t0 = time.perf_counter()
            scores = judge.score(items)
            u = judge.usage
            print(f"{per_call:8d} | {u['requests']:8d} | {u['requests'] / cands:18.3f} | "
                  f"{u['prompt_tokens'] / cands:23.1f} | {sum(s is None for s in scores):7d} | "
                  f"{time.perf_counter() - t0:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
