"""The M3P-Score and preference-pair selection (paper section 3.5, eq. 1-3).

For each prompt's candidates (columns `prompt_id`, `cand_idx`, `mas`, `logp`):

    R_w  = argmax_i MAS(R_i)                                                     (eq. 1)
    S(R_j) = (MAS(R_w) - MAS(R_j)) - alpha * max(0, logP(R_w) - logP(R_j) - delta)   (eq. 2)
    R_l  = argmax_{j != w} S(R_j)                                                 (eq. 3)

Choices the paper leaves open, made here:
- Ties break towards the lowest `cand_idx` (deterministic, independent of row order).
- R_l is drawn from the candidates whose MAS is strictly below MAS(R_w): a candidate as good as
  the winner carries no preference signal, yet with alpha > 0 it can out-score every worse one
  (S = 0 versus a negative S). A group where no such candidate exists yields no pair
  (`no_mas_gap`); a group with fewer than two candidates yields none either (`too_few`).
- Candidates sampled on a perturbed image (column `perturbation` not empty: contrastive sampling)
  are never R_w: they are extra hard negatives in the pool.
- Which log P feeds the score is the caller's choice (`logp_mean` by default in the run config:
  delta = 0.1 is only meaningful per token, and summed log P makes short answers look confident).

Strategies: `m3po` (eq. 1-3), `mas_gap` (alpha = 0, the paper's ablation: the lowest-MAS
candidate), `random` (R_w as above, R_l uniformly among the worse candidates: vanilla DPO) and
`rm_best_worst` (RM-DPO: the best against the worst by a reward model's score alone, here the
judge's rating, column `judge`; MAS and log P play no part). `random` draws from a hash of (seed,
prompt, candidate): a prompt gets the same pair whichever shard or table it is selected in.
Everything is vectorised over the given table (but `random`'s hash, one per candidate): no Python
loop per group. A prompt's pair depends on
its own candidates only, so the pipeline selects shard by shard (memory bounded by one shard).
"""
from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass

import numpy as np
import pyarrow as pa

STRATEGIES = ("m3po", "mas_gap", "random", "rm_best_worst")
ALPHA_ZERO_STRATEGIES = ("mas_gap", "rm_best_worst")  # the confidence term plays no part in these


def effective_alpha(strategy: str, alpha: float) -> float:
    """The alpha a strategy selects with: the configured one, or 0 where the strategy ignores log P
    (so neither alpha nor delta changes its pairs)."""
    return 0.0 if strategy in ALPHA_ZERO_STRATEGIES else alpha


@dataclass(frozen=True)
class SelectionStats:
    groups: int
    pairs: int
    skipped_too_few: int
    skipped_no_mas_gap: int
    skipped_no_clean_winner: int = 0   # every rated candidate was sampled on a perturbed image

    def __add__(self, other: "SelectionStats") -> "SelectionStats":
        return SelectionStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def as_dict(self) -> dict[str, int]:
        return {"groups": self.groups, "pairs": self.pairs, "skipped_too_few": self.skipped_too_few,
                "skipped_no_mas_gap": self.skipped_no_mas_gap, "skipped_no_clean_winner": self.skipped_no_clean_winner}


def m3p_score(mas_w, mas_j, logp_w, logp_j, alpha: float, delta: float):
    """Eq. 2, elementwise."""
    return (mas_w - mas_j) - alpha * np.maximum(0.0, logp_w - logp_j - delta)


def uniform_draws(seed: int, prompt_ids, cand) -> np.ndarray:
    """One draw in [0, 1) per candidate, a function of (seed, prompt_id, cand_idx) alone."""
    digests = (hashlib.blake2b(f"{seed}\x00{p}\x00{c}".encode(), digest_size=8).digest()
               for p, c in zip(prompt_ids, cand))
    return np.fromiter((int.from_bytes(d, "little") for d in digests), dtype=np.float64, count=len(cand)) / 2.0**64


def _first_per_group(group: np.ndarray, primary: np.ndarray, cand: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Row index of the max `primary` per group among eligible rows (ties: lowest cand_idx); -1 if none."""
    rows = np.flatnonzero(eligible)
    order = rows[np.lexsort((cand[rows], -primary[rows], group[rows]))]
    g = group[order]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = g[1:] != g[:-1]
    best = np.full(group.max() + 1 if len(group) else 0, -1, dtype=np.int64)
    best[g[is_first]] = order[is_first]
    return best


def select_pairs(
    table: pa.Table,
    alpha: float = 0.5,
    delta: float = 0.1,
    strategy: str = "m3po",
    logp_column: str = "logp",
    seed: int = 0,
) -> tuple[pa.Table, SelectionStats]:
    """Pick one (chosen, rejected) pair per prompt. Returns the pairs and what was skipped.

    Output columns: prompt_id, chosen_idx, rejected_idx, mas_chosen, mas_rejected, logp_chosen,
    logp_rejected, m3p_score (eq. 2 of the selected pair, with the alpha/delta given), strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
    if alpha < 0 or delta < 0:
        raise ValueError(f"alpha and delta must be >= 0 (got alpha={alpha}, delta={delta})")
    rank_column = "judge" if strategy == "rm_best_worst" else "mas"
    for col in ("prompt_id", "cand_idx", "mas", rank_column, logp_column):
        if col not in table.column_names:
            raise ValueError(f"selection input lacks column {col!r} (has {table.column_names})")
    alpha = effective_alpha(strategy, alpha)

    prompt_ids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    cand = table.column("cand_idx").to_numpy().astype(np.int64)
    mas = table.column("mas").to_numpy(zero_copy_only=False).astype(np.float64)
    logp = table.column(logp_column).to_numpy(zero_copy_only=False).astype(np.float64)
    rank = table.column(rank_column).to_numpy(zero_copy_only=False).astype(np.float64)
    # Candidates without a MAS (the judge could not rate them) take part in no pair.
    rated = ~np.isnan(rank)
    uniq, group = np.unique(prompt_ids, return_inverse=True)
    n_groups = len(uniq)
    size = np.bincount(group[rated], minlength=n_groups)

    # Candidates sampled on a perturbed image (contrastive sampling) are negatives only.
    clean = np.array([p in ("", None) for p in table.column("perturbation").to_pylist()], dtype=bool) \
        if "perturbation" in table.column_names else np.ones(len(cand), dtype=bool)
    w = _first_per_group(group, rank, cand, rated & clean)                # eq. 1
    has_w = w >= 0
    w_rows = np.where(has_w, w, 0)
    rank_w, logp_w, cand_w = rank[w_rows][group], logp[w_rows][group], cand[w_rows][group]
    eligible = rated & (cand != cand_w) & (rank < rank_w)
    score = m3p_score(rank_w, rank, logp_w, logp, alpha, delta)           # eq. 2
    if strategy == "random":
        primary = uniform_draws(seed, prompt_ids, cand)
    else:
        primary = score
    l = _first_per_group(group, primary, cand, eligible)                  # eq. 3

    too_few = size < 2
    no_winner = (~too_few) & ~has_w
    made = (~too_few) & has_w & (l >= 0)
    no_gap = (~too_few) & has_w & (l < 0)
    gw, gl = w[made], l[made]
    pairs = pa.table({
        "prompt_id": pa.array(uniq[made].tolist(), pa.string()),
        "chosen_idx": pa.array(cand[gw], pa.int32()),
        "rejected_idx": pa.array(cand[gl], pa.int32()),
        "mas_chosen": mas[gw], "mas_rejected": mas[gl],
        "logp_chosen": logp[gw], "logp_rejected": logp[gl],
        "m3p_score": m3p_score(mas[gw], mas[gl], logp[gw], logp[gl], alpha, delta),
        "strategy": pa.array([strategy] * int(made.sum()), pa.string()),
    })
    stats = SelectionStats(groups=n_groups, pairs=int(made.sum()), skipped_too_few=int(too_few.sum()),
                           skipped_no_mas_gap=int(no_gap.sum()), skipped_no_clean_winner=int(no_winner.sum()))
    return pairs, stats
