"""Which pairs: the filter that the viewer (`m3po view`) and the exports (`m3po export`) share.

`PairIndex.build(store)` reads pairs.parquet's scalar columns (never its answers or token ids) and
joins each pair's instruction kind, source, image and prompts shard from the prompts stage.
`PairFilter` selects rows of that index with Arrow's compute functions (no Python loop over rows),
`PairIndex.select` sorts them, and `PairIndex.rows` reads the full rows of a page from the row
groups that hold them (pairs.parquet is written in groups of `schema.PAIRS_ROW_GROUP` rows).

Gaps are chosen minus rejected: `mas_gap = mas_chosen - mas_rejected`, `logp_gap = logp_chosen -
logp_rejected` (log P as the selection read it, `selection.logp`).
Arrow is imported where tables are worked on, so the CLI can build its options from `PairFilter`
without it. Memory: the index holds ~150 bytes a pair plus its instruction (~40 MB at 150K pairs).
Limit: a pairs.parquet written as one row group (before PAIRS_ROW_GROUP) is read whole per page.
"""
from __future__ import annotations

import bisect
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from m3po_core.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

    from m3po_core.store import RunStore

SORTABLE = ("prompt_id", "m3p_score", "mas_gap", "logp_gap", "mas_chosen", "mas_rejected",
            "logp_chosen", "logp_rejected", "strategy", "kind", "source")
_SCALARS = ["prompt_id", "instruction", "strategy", "chosen_idx", "rejected_idx", "mas_chosen", "mas_rejected",
            "logp_chosen", "logp_rejected", "m3p_score"]


@dataclass
class PairFilter:
    """The criteria a user picks pairs by (every field optional; all given ones must hold)."""

    strategy: Optional[str] = field(default=None, metadata={"help": "the selection strategy that made the pair (m3po, ipa, ...)"})
    kind: Optional[str] = field(default=None, metadata={"help": "the prompt's instruction kind (synthetic world) or 'open'"})
    source: Optional[str] = field(default=None, metadata={"help": "the prompt's source (dataset or file)"})
    text: Optional[str] = field(default=None, metadata={"help": "a substring of the instruction (case-insensitive)"})
    min_mas_gap: Optional[float] = field(default=None, metadata={"help": "mas_chosen - mas_rejected at least this"})
    max_mas_gap: Optional[float] = field(default=None, metadata={"help": "mas_chosen - mas_rejected at most this"})
    min_logp_gap: Optional[float] = field(default=None, metadata={"help": "logp_chosen - logp_rejected at least this"})
    max_logp_gap: Optional[float] = field(default=None, metadata={"help": "logp_chosen - logp_rejected at most this"})
    min_m3p: Optional[float] = field(default=None, metadata={"help": "the rejected answer's M3P-Score at least this"})
    max_m3p: Optional[float] = field(default=None, metadata={"help": "the rejected answer's M3P-Score at most this"})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "filter") -> "PairFilter":
        """From query parameters or CLI options (strings); empty values are absent. A value that is
        not a number where one is needed is refused, naming the field."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = values.get(f.name)
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue
            if f.name.startswith(("min_", "max_")):
                try:
                    out[f.name] = float(raw)
                except (TypeError, ValueError):
                    raise InputError(f"{where}: {f.name}={raw!r} is not a number") from None
            else:
                out[f.name] = str(raw).strip()
        return cls(**out)

    def as_params(self) -> dict[str, str]:
        """The set fields as query parameters (what `from_mapping` reads back)."""
        return {k: f"{v:g}" if isinstance(v, float) else str(v)
                for k, v in dataclasses.asdict(self).items() if v is not None}

    def mask(self, table: "pa.Table") -> "pa.Array":
        """True for the index rows (PairIndex.table) that pass every set criterion."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pa.array([True] * table.num_rows)
        for name in ("strategy", "kind", "source"):
            value = getattr(self, name)
            if value is not None:
                keep = pc.and_(keep, pc.fill_null(pc.equal(table.column(name), value), False))
        if self.text:
            keep = pc.and_(keep, pc.fill_null(pc.match_substring(table.column("instruction"), self.text,
                                                                 ignore_case=True), False))
        for column, low, high in (("mas_gap", self.min_mas_gap, self.max_mas_gap),
                                  ("logp_gap", self.min_logp_gap, self.max_logp_gap),
                                  ("m3p_score", self.min_m3p, self.max_m3p)):
            if low is not None:
                keep = pc.and_(keep, pc.fill_null(pc.greater_equal(table.column(column), low), False))
            if high is not None:
                keep = pc.and_(keep, pc.fill_null(pc.less_equal(table.column(column), high), False))
        return keep


class PairIndex:
    """A run's pairs, one index row each: `row` (its row in pairs.parquet), the scalar columns, the
    gaps, and the prompt's kind, source, image and shard (null where the prompts stage lacks it)."""

    def __init__(self, store: "RunStore", table: "pa.Table", prompts: "pa.Table"):
        self.store, self.table = store, table
        self.prompts = prompts  # prompt_id, kind, source, image, shard: every prompt of the run
        self._row_groups: list[int] | None = None
        self._values: dict[str, list[str]] = {}
        self._prompt_rows: dict[str, int] | None = None  # prompt_id -> its row in `prompts`
        self._pair_rows: dict[str, int] | None = None    # prompt_id -> its pair's row in pairs.parquet

    @classmethod
    def build(cls, store: "RunStore") -> "PairIndex":
        import pyarrow as pa
        import pyarrow.compute as pc

        if not store.exists("pairs.parquet"):
            raise InputError(f"{store.url('pairs.parquet')}: the run has no pairs yet (its select step has not run)")
        with store.parquet_file("pairs.parquet") as pf:
            pairs = pf.read(columns=_SCALARS)
        pairs = pairs.append_column("row", pa.array(range(pairs.num_rows), pa.int64()))
        pairs = pairs.append_column("mas_gap", pc.subtract(pairs.column("mas_chosen"), pairs.column("mas_rejected")))
        pairs = pairs.append_column("logp_gap", pc.subtract(pairs.column("logp_chosen"), pairs.column("logp_rejected")))
        prompts = read_prompt_index(store)
        table = pairs.join(prompts, "prompt_id", join_type="left outer").sort_by("row")
        return cls(store, table, prompts)

    def values(self, column: str) -> list[str]:
        """The distinct values of a text column (strategy, kind, source), sorted (read once)."""
        import pyarrow.compute as pc

        if column not in self._values:
            self._values[column] = sorted(v for v in pc.unique(self.table.column(column)).to_pylist() if v is not None)
        return self._values[column]

    @property
    def strategies(self) -> list[str]:
        return self.values("strategy")

    @property
    def kinds(self) -> list[str]:
        return self.values("kind")

    @property
    def sources(self) -> list[str]:
        return self.values("source")

    def select(self, flt: PairFilter | None = None, sort: str = "prompt_id", descending: bool = False) -> "pa.Table":
        """The index rows that pass `flt`, sorted by `sort` (one of SORTABLE)."""
        if sort not in SORTABLE:
            raise InputError(f"sort={sort!r}: not a column to sort by (one of {', '.join(SORTABLE)})")
        table = self.table if flt is None else self.table.filter(flt.mask(self.table))
        return table.sort_by([(sort, "descending" if descending else "ascending"), ("row", "ascending")])

    def rows(self, rows: list[int], columns: list[str] | None = None) -> list[dict[str, Any]]:
        """Full rows of pairs.parquet (all columns, or `columns`) by row number, in the order given:
        only the row groups that hold them are read."""
        if not rows:
            return []
        with self.store.parquet_file("pairs.parquet") as pf:
            return self._take(pf, rows, columns)

    def _take(self, pf, rows: list[int], columns: list[str] | None) -> list[dict[str, Any]]:
        import pyarrow as pa

        if self._row_groups is None:  # the first row of each row group, and the end
            starts = [0]
            for i in range(pf.metadata.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
            self._row_groups = starts
        starts = self._row_groups
        group_of = {r: bisect.bisect_right(starts, r) - 1 for r in rows}
        wanted = sorted(set(group_of.values()))
        table = pf.read_row_groups(wanted, columns=columns)
        offset, base = {}, 0  # where each read group begins in `table`
        for g in wanted:
            offset[g] = base
            base += starts[g + 1] - starts[g]
        position = [offset[group_of[r]] + r - starts[group_of[r]] for r in rows]
        return table.take(pa.array(position, pa.int64())).to_pylist()

    def prompt(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompts index row of `prompt_id` (kind, source, image, shard), or None."""
        if self._prompt_rows is None:  # built on first use: one dict lookup per thumbnail after
            self._prompt_rows = {p: i for i, p in enumerate(self.prompts.column("prompt_id").to_pylist())}
        i = self._prompt_rows.get(prompt_id)
        return None if i is None else self.prompts.slice(i, 1).to_pylist()[0]

    def pair_of(self, prompt_id: str) -> dict[str, Any] | None:
        """The full pair row of `prompt_id`, or None if it has no pair."""
        if self._pair_rows is None:
            self._pair_rows = dict(zip(self.table.column("prompt_id").to_pylist(), self.table.column("row").to_pylist()))
        row = self._pair_rows.get(prompt_id)
        return None if row is None else self.rows([row])[0]


def read_prompt_index(store: "RunStore", stage: str = "prompts") -> "pa.Table":
    """Every complete prompts shard's prompt_id, kind, source, image and its SHA-256, with its shard number
    (the candidates and scores shard of the same number hold its candidates). Shards are read
    concurrently (an object store's round trips overlap)."""
    import pyarrow as pa

    from m3po_core.store import COMPLETE

    columns = ["prompt_id", "kind", "source", "image", "image_sha256"]
    empty = pa.table({c: pa.array([], pa.string()) for c in columns}).append_column("shard", pa.array([], pa.int32()))
    if not store.exists(f"{stage}/_stage.json"):
        return empty
    n = store.read_json(f"{stage}/_stage.json")["n_shards"]
    entries = {e["shard"]: e for e in store.manifest(stage)}
    done = [i for i in range(n) if entries.get(i, {}).get("state") == COMPLETE]

    def one(shard: int) -> pa.Table:
        t = store.read_shard(stage, shard, columns)
        return t.append_column("shard", pa.array([shard] * t.num_rows, pa.int32()))

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(one, done))
    return pa.concat_tables(parts) if parts else empty
