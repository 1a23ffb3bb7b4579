"""Adaptive candidate counts: when a prompt's pair is settled, so that sampling can stop early.

Candidates are sampled and scored in rounds of `sampling.round_size` (k) per prompt, up to
`sampling.n`. After each round a prompt's pair is selected on the candidates it has so far (the
same eq. 1-3 as at the end, `m3po_core.selection`), and the prompt stops when that pair is settled:

1. **A real preference.** The pair's MAS gap, MAS(R_w) - MAS(R_l), is at least
   `sampling.settle_gap`: the chosen answer is better than the rejected one by more than the
   spread between answers of the same quality (the judge's verdict on them differs, not just the
   encoder's similarity).
2. **A confident rejected answer** (strategy `m3po`, alpha > 0): R_l pays no confidence penalty
   in eq. 2, logP(R_l) >= logP(R_w) - delta, so its M3P-Score is its whole MAS gap. A later sample
   can beat it only by being worse by MAS and at least as likely under the model: that moves the
   pair's gap, not its kind (a right answer against a wrong one the model is as sure of), which
   is what the M3P-Score looks for. For the alpha = 0 strategies (`mas_gap`, `rm_best_worst`) and
   `random` the gap alone decides.

3. **Patience.** From round `sampling.settle_rounds` on (default 2: 16 candidates) the gap alone
   settles a pair, and a prompt whose rated answers all have one MAS (the same answer, repeated)
   stops: 16 draws of one answer put the chance of another below 3/16 per draw (the rule of three,
   95 %), and such a prompt gives no pair at N = 32 either, most of the time.

A prompt with neither (answers that differ, but by less than the gap) is sampled again, up to n;
what more samples could still change for a settled prompt is a better winner by the encoder's
similarity or a wrong answer with a larger gap. The defaults (k = 8, gap 0.3, 2 rounds) were chosen
on the demo's training prompts (their pools at N = 32 cut to their first 8, 16, 24 candidates):
0.41 of the candidates, 97 % of the pairs, 85 % of them the same pair as at N = 32. Candidates keep their
indices and per-candidate seeds (`sampling.seeding: candidate`), so the first k of a prompt are the
same with and without adaptivity, and a run with a larger n samples only the rounds it lacks.
Limit: the rule reads one prompt's pool at a time and knows nothing of the other prompts; it does
not estimate the chance that a later sample changes the pair, it bounds what such a change is.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from m3po_core.selection import effective_alpha, select_pairs


def n_rounds(n: int, round_size: int) -> int:
    """Rounds needed for n candidates (the last round may be smaller)."""
    return math.ceil(n / round_size)


def round_span(r: int, n: int, round_size: int) -> tuple[int, int]:
    """Candidate indices [first, end) of round r: round r holds candidates r*k .. min((r+1)*k, n) - 1."""
    first = r * round_size
    return first, min(first + round_size, n)


def settled(table: pa.Table, *, rounds_done: int, settle_gap: float, settle_rounds: int, strategy: str = "m3po",
            alpha: float = 0.5, delta: float = 0.1, logp_column: str = "logp", seed: int = 0) -> set[str]:
    """The prompts of `table` (rows: prompt_id, cand_idx, mas, judge, `logp_column`, perturbation:
    every candidate each prompt has so far, after `rounds_done` rounds) settled by the rule above."""
    if table.num_rows == 0:
        return set()
    late = rounds_done >= settle_rounds
    pairs, _ = select_pairs(table, alpha=alpha, delta=delta, strategy=strategy, logp_column=logp_column, seed=seed)
    done: set[str] = set()
    if pairs.num_rows:
        gap = pairs.column("mas_chosen").to_numpy() - pairs.column("mas_rejected").to_numpy()
        ok = gap >= settle_gap
        if not late and strategy == "m3po" and effective_alpha(strategy, alpha) > 0:
            excess = pairs.column("logp_chosen").to_numpy() - pairs.column("logp_rejected").to_numpy() - delta
            ok &= excess <= 0  # no confidence penalty in eq. 2
        done |= set(np.asarray(pairs.column("prompt_id").to_pylist(), dtype=object)[ok].tolist())
    if late:
        done |= uniform_prompts(table)
    return done


def uniform_prompts(table: pa.Table) -> set[str]:
    """Prompts whose rated candidates (two or more) all have the same MAS: one answer, repeated."""
    ids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    mas = table.column("mas").to_numpy(zero_copy_only=False).astype(np.float64)
    rated = ~np.isnan(mas)
    uniq, group = np.unique(ids[rated], return_inverse=True)
    if not len(uniq):
        return set()
    hi = np.full(len(uniq), -np.inf)
    lo = np.full(len(uniq), np.inf)
    np.maximum.at(hi, group, mas[rated])
    np.minimum.at(lo, group, mas[rated])
    count = np.bincount(group, minlength=len(uniq))
    return set(uniq[(count >= 2) & (hi - lo <= 1e-12)].tolist())
