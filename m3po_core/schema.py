"""Arrow schemas of the tables a run writes (see DESIGN.md, "The tables a run writes").

Every stage writes with an explicit schema, so a column that changes type is an error at the
writer, not a surprise at the reader.
"""
import pyarrow as pa

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("image", pa.string()),          # URL of the image file (local path, file://, s3://)
        ("instruction", pa.string()),
        ("reference", pa.string()),      # the source's reference answer, if it has one
        ("kind", pa.string()),           # instruction kind (synthetic world) or "open"
        ("source", pa.string()),
        ("scene", pa.string()),          # synthetic world's scene graph as JSON (reference judge)
        ("image_sha256", pa.string()),   # SHA-256 of the image file's bytes when the prompts were made
    ]
)

CANDIDATES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("cand_idx", pa.int32()),
        ("text", pa.string()),           # decoded completion, special tokens removed
        ("token_ids", pa.list_(pa.int32())),  # completion tokens as sampled, EOS included if emitted
        # Raw (untempered, unfiltered) model log-probabilities of the sampled tokens, read off the
        # generation's own logits: log P(R | I, Q) under the base model, no second forward pass.
        ("logp_sum", pa.float64()),
        ("logp_mean", pa.float64()),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "stop" (EOS emitted) or "length"
        ("sampler", pa.string()),
        ("seed", pa.int64()),
        # "" for the clean image; else the perturbation it was sampled on (m3po_core/perturb.py)
        ("perturbation", pa.string()),
    ]
)

SCORES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("cand_idx", pa.int32()),
        ("clip", pa.float64()),          # cosine similarity image/response
        ("judge", pa.float64()),         # judge overall in [0, 1]; null if the judge could not rate
        ("judge_relevance", pa.float64()),
        ("judge_accuracy", pa.float64()),
        ("judge_adherence", pa.float64()),
        ("mas", pa.float64()),
    ]
)

PAIRS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("image", pa.string()),
        ("instruction", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_idx", pa.int32()),
        ("rejected_idx", pa.int32()),
        ("chosen_token_ids", pa.list_(pa.int32())),
        ("rejected_token_ids", pa.list_(pa.int32())),
        ("mas_chosen", pa.float64()),
        ("mas_rejected", pa.float64()),
        ("logp_chosen", pa.float64()),
        ("logp_rejected", pa.float64()),
        ("m3p_score", pa.float64()),
        ("strategy", pa.string()),
    ]
)

# pairs.parquet's rows per row group: a page of the viewer or a batch of an export reads the row
# groups that hold its rows, not the whole table (150K pairs of ~2.4 kB each): a page sorted by a
# score touches up to one group per row, so groups stay small.
PAIRS_ROW_GROUP = 512

PREDICTIONS = pa.schema(
    [
        ("model", pa.string()),          # "base" or the trained adapter's name
        ("benchmark", pa.string()),
        ("question_id", pa.string()),
        ("row_id", pa.string()),
        ("category", pa.string()),
        ("instruction", pa.string()),
        ("answer", pa.string()),
        ("prediction", pa.string()),
    ]
)

IPA_RESPONSES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("resp_idx", pa.int32()),
        ("origin", pa.string()),         # "normal", "contrastive" or "revised"
        ("perturbation", pa.string()),   # contrastive samples: noise / blur / scale; else ""
        ("parent_idx", pa.int32()),      # revised: the response it revises; else -1
        ("feedback", pa.string()),       # revised: the reviser's diagnostic feedback; else ""
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),  # as sampled, or the policy's tokens of a revised text (+ EOS)
        ("entailment", pa.bool_()),      # the verifier's four conditions; null: it could not judge
        ("completeness", pa.bool_()),
        ("no_contradiction", pa.bool_()),
        ("compliance", pa.bool_()),
        ("verified", pa.bool_()),        # all four hold
    ]
)


def add_candidate(out: dict[str, list], prompt_id: str, idx: int, c, sampler: str, perturbation: str) -> None:
    """Append one `m3po_core.sampling.Candidate` to column lists of CANDIDATES."""
    for col, val in (("prompt_id", prompt_id), ("cand_idx", idx), ("text", c.text), ("token_ids", c.token_ids),
                     ("logp_sum", c.logp_sum), ("logp_mean", c.logp_mean), ("n_tokens", c.n_tokens),
                     ("finish_reason", c.finish_reason), ("sampler", sampler), ("seed", c.seed),
                     ("perturbation", perturbation)):
        out[col].append(val)
