"""The Multimodal Alignment Score (paper 3.3).

    MAS = clip_weight * unit(cos(image, response))  +  judge_weight * judge.overall

unit() is `scoring.clip_mapping`: CLIPScore, min(max(2.5 * cos, 0), 1), for pretrained CLIP
encoders (their image-text cosines sit in about 0.15-0.35, where (cos + 1) / 2 would move by a few
hundredths across a prompt's candidates and the CLIP term could only break ties between equal
judge ratings), and (cos + 1) / 2 for the tiny CLIP trained here; with BLIP-2 image-text matching
as the encoder, its match probability enters as it is. Both parts lie in [0, 1], so the weights
say how much each counts; they default to 0.2 / 0.8 because the CLIP similarity sees the image
but not the instruction (it cannot tell a right "yes" from a wrong one), while the judge rates
visual relevance, semantic accuracy and instruction adherence. The paper does not give weights.
A candidate the judge could not rate gets no MAS (null) and takes part in no pair.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from m3po_core import schema
from m3po_core.config import ScoringConfig
from m3po_core.scoring.clip import ClipScorer, unit_scores


def make_judge(cfg: ScoringConfig, cache_dir: str | None = None):
    """The judge a scoring configuration names (an ensemble with `extra_judges`); `cache_dir` keeps
    a model judge's ratings."""
    judge = _one_judge(cfg, cfg.judge, cfg.judge_base_url, cfg.judge_api_key_env, cache_dir)
    if not cfg.extra_judges:
        return judge
    from m3po_core.scoring.ensemble import JudgeEnsemble

    return JudgeEnsemble([judge] + [_one_judge(cfg, s.judge, s.base_url, s.api_key_env, cache_dir)
                                    for s in cfg.extra_judges])


def _one_judge(cfg: ScoringConfig, name: str, base_url: str | None, api_key_env: str, cache_dir: str | None):
    if name == "reference":
        from m3po_core.scoring.judge import ReferenceJudge

        return ReferenceJudge()
    if name.startswith("openai:"):
        from m3po_core.scoring.openai_judge import OpenAIJudge

        return OpenAIJudge(model=name.removeprefix("openai:"), base_url=base_url,
                           api_key_env=api_key_env, concurrency=cfg.judge_concurrency,
                           candidates_per_call=cfg.judge_candidates_per_call, cache_dir=cache_dir,
                           price_per_1k_input=cfg.judge_price_per_1k_input,
                           price_per_1k_output=cfg.judge_price_per_1k_output)
    raise ValueError(f"unknown judge {name!r}")


def score_candidates(prompts: Sequence[dict[str, Any]], images: Sequence[Image.Image], candidates: pa.Table,
                     clip: ClipScorer, cfg: ScoringConfig, judge=None, budget=None,
                     known: dict[tuple[str, int], Any] | None = None) -> pa.Table:
    """Score one shard: each prompt's image encoded once, its candidates batched. With a judge
    `budget` (m3po_core/scoring/budget.py) the judge rates what the budget pays for; the rest stay
    unrated. `known`: (prompt_id, cand_idx) -> JudgeScore already rated (a retry of a published
    shard): those are not sent to the judge again."""
    from m3po_core.scoring.budget import rate_within_budget
    from m3po_core.scoring.judge import JudgeItem

    by_prompt = {p["prompt_id"]: i for i, p in enumerate(prompts)}
    pid = candidates.column("prompt_id").to_pylist()
    texts = candidates.column("text").to_pylist()
    missing = sorted(set(pid) - set(by_prompt))
    if missing:
        raise ValueError(f"candidates reference prompts not in the shard: {missing[:5]}")
    # Group candidate rows by prompt, in prompt order, for one image encode per prompt.
    rows_of = [[] for _ in prompts]
    for r, p in enumerate(pid):
        rows_of[by_prompt[p]].append(r)
    sims = clip.score(images, [[texts[r] for r in rows] for rows in rows_of])
    clip_col = np.empty(len(pid))
    for rows, s in zip(rows_of, sims):
        clip_col[rows] = s

    judge = judge or make_judge(cfg)
    known = known or {}
    cand = candidates.column("cand_idx").to_pylist()
    rated: list[Any] = [known.get((p, c)) for p, c in zip(pid, cand)]
    todo = [r for r, score in enumerate(rated) if score is None]
    items = []
    for r in todo:
        prompt = prompts[by_prompt[pid[r]]]
        items.append(JudgeItem(prompt_id=pid[r], instruction=prompt["instruction"], response=texts[r],
                               image=images[by_prompt[pid[r]]],
                               meta={"scene": prompt.get("scene"), "kind": prompt.get("kind"),
                                     "reference": prompt.get("reference")}))
    for r, score in zip(todo, rate_within_budget(judge, items, budget)):
        rated[r] = score
    nan = float("nan")
    parts = {k: np.array([getattr(s, k) if s is not None else nan for s in rated], dtype=float)
             for k in ("overall", "relevance", "accuracy", "adherence")}
    mas = cfg.clip_weight * unit_scores(clip, clip_col, cfg.cosine_mapping(cfg.clip.name)) \
        + cfg.judge_weight * parts["overall"]
    return pa.table({
        "prompt_id": pa.array(pid, pa.string()),
        "cand_idx": candidates.column("cand_idx"),
        "clip": clip_col,
        "judge": pa.array(parts["overall"], from_pandas=True),
        "judge_relevance": pa.array(parts["relevance"], from_pandas=True),
        "judge_accuracy": pa.array(parts["accuracy"], from_pandas=True),
        "judge_adherence": pa.array(parts["adherence"], from_pandas=True),
        "mas": pa.array(mas, from_pandas=True),
    }, schema=schema.SCORES)


def known_ratings(table: pa.Table) -> dict[tuple[str, int], Any]:
    """(prompt_id, cand_idx) -> the JudgeScore of every rated row of a published scores table."""
    from m3po_core.scoring.judge import JudgeScore

    cols = [table.column(c).to_pylist() for c in ("prompt_id", "cand_idx", "judge", "judge_relevance",
                                                  "judge_accuracy", "judge_adherence")]
    return {(p, c): JudgeScore(relevance=rel, accuracy=acc, adherence=adh, overall=j)
            for p, c, j, rel, acc, adh in zip(*cols) if j is not None and j == j}


def variance_sums(groups: Sequence[Sequence[tuple[float, float]]]) -> np.ndarray:
    """Pooled within-prompt sums of squares of the CLIP and judge terms and twice their cross
    products, `[clip, judge, cross]`; sums over disjoint sets of prompts add up."""
    sums = np.zeros(3)
    for group in groups:
        if len(group) < 2:
            continue
        dev = np.asarray(group, dtype=float)
        dev = dev - dev.mean(axis=0)
        sums += [(dev[:, 0] ** 2).sum(), (dev[:, 1] ** 2).sum(), 2 * (dev[:, 0] * dev[:, 1]).sum()]
    return sums


def variance_shares(groups: Sequence[Sequence[tuple[float, float]]] | None = None,
                    sums: np.ndarray | None = None) -> dict[str, float] | None:
    """What drives selection: the shares of the within-prompt variance of MAS that come from its CLIP
    term, its judge term and their covariance (they sum to 1). `groups`: per prompt, each rated
    candidate's (clip term, judge term), the weighted parts whose sum is its MAS (or their
    `variance_sums`, added over shards). Deviations are taken from each prompt's own means and
    pooled over prompts, since selection compares a prompt's candidates with each other only. None
    when MAS does not vary within any prompt."""
    ss_clip, ss_judge, cross = variance_sums(groups or []) if sums is None else sums
    total = ss_clip + ss_judge + cross
    if total <= 0:
        return None
    return {"clip": float(ss_clip / total), "judge": float(ss_judge / total), "covariance": float(cross / total)}
