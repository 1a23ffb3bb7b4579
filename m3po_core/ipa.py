"""IPA: instruction-oriented preference alignment (Wang et al., ICCV 2025; arXiv 2503.20309), the
second method on the same parts: samplers, judges, store, shards, training and evaluation.

Per round r, per shard of that round's prompts (`ipa_shard`, cached like every shard):

1. **Sampling**: `ipa.n_normal` responses on the clean image and `ipa.n_contrastive` on a perturbed
   copy (noise, blur or scaling, one drawn per sample: m3po_core/perturb.py), each recorded
   (`origin`, `perturbation`).
2. **Reflective revision** (`ipa.revise`): the reviser writes diagnostic feedback on each response,
   then a refined response from that feedback; both are kept (`origin = revised`, `feedback`,
   `parent_idx`). From round `ipa.reference_feedback_from_round` the reference answer is shown to the
   feedback step only (reference-guided feedback; the paper found reference-guided *sampling* makes
   the policy imitate, so sampling never sees it).
3. **Instruction-oriented verification**: the verifier decides four conditions against the reference
   answer: logical entailment (the reference follows from the response), detail completeness, no
   contradiction, instruction compliance. `verified` = all four; a response the verifier could not
   judge stays null and takes part in no pair.

Then `collect_round`: a prompt with a verified and a failed response gives one pair (one of each,
drawn with `ipa.seed`); a prompt with no verified response is **unresolved** and carried to round
r + 1; a prompt whose responses all verify gives no pair (nothing to prefer). Feedback pairs (the
feedback behind a verified revision against one behind a failed revision, the paper's P^fb) are kept.

Round 2 is **self-evolution**: the generator is first DPO-trained (LoRA) on the round-1 pairs, and
so is the reviser when it is the policy itself (`ipa.reviser: policy`: the same adapter learns the
feedback pairs too). Round 3 adds the reference answer to the feedback step. The pairs of all rounds
form `pairs.parquet`, and training and evaluation are M3PO's own stages.

Revisers and verifiers:
- `reference` (synthetic world only, like the reference judge): the verifier decides the four
  conditions from the scene graph (reading responses as the reference judge does; compliance = the
  world's IFT rules for that instruction, m3po_core/evaluation/ift.py). The reviser is simulated:
  its feedback lists what the verifier finds wrong; its refinement fixes the response (gives the
  reference answer) on a share `ipa.fix_rate` of the prompts (`ipa.reference_fix_rate` with the
  reference in the feedback step), the prompts drawn by a hash of (seed, prompt): a prompt it
  cannot fix stays hard for it, so only a better generator (round 2) or the reference (round 3)
  resolves it. Elsewhere it returns the response unchanged. A stand-in for a model reviser, as the
  reference judge is for GPT-4V.
- `policy` / `openai:<model>`: the feedback and refinement prompts below, answered greedily by the
  generator through the sampling backend, or by an OpenAI-compatible VLM.
- `openai:<model>` verifier: a rubric asking for the four conditions as JSON booleans, read by a
  tolerant parser, retried with backoff; still unreadable after the retries -> not verified (null).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from m3po_core.sampling import greedy_batched

log = logging.getLogger("m3po.ipa")

CONDITIONS = ("entailment", "completeness", "no_contradiction", "compliance")

FEEDBACK_PROMPT = (
    "Here is a question about the image and an answer to it.\nQuestion: {instruction}\nAnswer: {response}\n"
    "{reference}Point out the answer's critical deficiencies: statements the image does not support, details "
    "the question needs that are missing, and where it does not do what the question asks. Be brief.")
REFERENCE_LINE = "A reference answer: {reference}\n"
REFINE_PROMPT = (
    "Question: {instruction}\nAnswer: {response}\nFeedback: {feedback}\n"
    "Write an improved answer to the question that fixes these deficiencies. Reply with the answer only.")
VERIFY_PROMPT = (
    "You verify an answer to a question about the image against a reference answer.\n"
    "Question: {instruction}\nReference answer: {reference}\nAnswer to verify: {response}\n\n"
    "Decide four conditions, each true or false:\n"
    "- entailment: the reference answer can be logically derived from the answer\n"
    "- completeness: the answer misses no detail the question needs\n"
    "- no_contradiction: the answer contradicts neither the reference nor the image\n"
    "- compliance: the answer does what the question asks, in the form it asks for\n"
    'Reply with JSON only: {{"entailment": true, "completeness": true, "no_contradiction": true, '
    '"compliance": true}}')


@dataclass(frozen=True)
class Verdict:
    entailment: bool
    completeness: bool
    no_contradiction: bool
    compliance: bool

    @property
    def verified(self) -> bool:
        return self.entailment and self.completeness and self.no_contradiction and self.compliance

    def failed(self) -> list[str]:
        return [c for c in CONDITIONS if not getattr(self, c)]


@dataclass(frozen=True)
class Item:
    """One response to verify or revise, with what the reviser and verifier may read."""

    prompt_id: str
    image: Image.Image
    instruction: str
    response: str
    reference: str
    scene: str | None = None


# ------------------------------------------------------------------ verifiers

class ReferenceVerifier:
    """The four conditions decided from the synthetic world's scene graph."""

    name = "reference"

    def verify(self, items: Sequence[Item]) -> list[Verdict | None]:
        return [self._one(i) for i in items]

    def _one(self, item: Item) -> Verdict:
        from m3po_core.data import synthetic as world
        from m3po_core.evaluation import ift
        from m3po_core.scoring import judge as j

        if not item.scene:
            from m3po_core.errors import InputError

            raise InputError(f"prompt {item.prompt_id}: the reference verifier needs the scene graph")
        scene = world.Scene.from_json(item.scene)
        kind, params = world.parse_instruction(item.instruction)
        tokens = j.tokenize(item.response)
        if not tokens:
            return Verdict(False, False, False, False)
        explained = world.explains(kind, item.reference)
        explanation = None
        if explained:  # its answer is the first sentence, its explanation the rest
            tokens, rest = j.split_explained(tokens)
            explanation = j.read_tokens(rest)
        reading = j.read_tokens(tokens)
        reference = world.answer_text(scene, kind, params)
        accuracy = j.accuracy_of(reading, scene, kind, params, reference)
        present = scene.pairs()  # a mention claims presence ("red circle") or absence ("no red circle")
        false_claim = any(((m.colour, m.shape) in present) == m.negated for m in reading.mentions)
        truth = {(o.colour, o.shape, o.position) for o in scene.objects}
        stated = {(m.colour, m.shape, m.position) for m in reading.mentions if not m.negated}
        if kind == "describe" or kind in world.OPEN_KINDS:
            named = {(c, s) for c, s, _ in stated}
            entailment = all((o.colour, o.shape) in named for o in scene.objects)
            if kind == "list":  # names the objects, not their places
                completeness, no_contradiction = entailment, not false_claim and named <= present
            else:
                completeness = truth <= stated
                no_contradiction = not false_claim and stated <= truth
        else:
            entailment = accuracy == 1.0
            if kind in world.YES_NO_KINDS:  # the reference explains its yes/no: so must the answer
                answer = next((k for k, t in enumerate(tokens) if t in ("yes", "no")), None)
                after = j.read_tokens(tokens[answer + 1:]) if answer is not None else j.read_tokens([])
                completeness = bool(after.mentions or after.numbers or after.positions)
            elif kind in ("colour", "position"):
                completeness = params["shape"] in tokens
            else:
                completeness = True
            no_contradiction = not false_claim and accuracy != 0.5  # 0.5: a wrong fact beside a right answer
        if explained:  # the explanation must name every object in its place, and nothing else
            said = {(m.colour, m.shape, m.position) for m in explanation.mentions if not m.negated}
            completeness = completeness and truth <= said
            no_contradiction = no_contradiction and said <= truth
        rules = [c for c in ift.synthetic_constraints(kind, params, explained) if c["type"] != "judge"]
        compliance = all(ift.check(item.response, c) for c in rules)
        return Verdict(entailment, completeness, no_contradiction, compliance)


def parse_verdict(text: str) -> Verdict | None:
    """The four conditions from a verifier's reply: a JSON object anywhere in it (fences allowed),
    keys matched loosely, values true/false/yes/no; None if any condition is missing."""
    found: dict[str, bool] = {}
    for blob in re.findall(r"\{[^{}]*\}", text, re.S):
        try:
            obj = json.loads(blob)
        except ValueError:
            continue
        for key, value in obj.items():
            norm = re.sub(r"[^a-z]", "", str(key).lower())
            name = next((c for c in CONDITIONS if c.replace("_", "") in norm), None)
            if name is None:
                continue
            if isinstance(value, bool):
                found[name] = value
            elif str(value).strip().lower() in ("true", "yes", "1"):
                found[name] = True
            elif str(value).strip().lower() in ("false", "no", "0"):
                found[name] = False
    if not all(c in found for c in CONDITIONS):
        return None
    return Verdict(**{c: found[c] for c in CONDITIONS})


class OpenAIVerifier:
    """An OpenAI-compatible VLM deciding the four conditions (`VERIFY_PROMPT`)."""

    def __init__(self, model: str, base_url: str | None, api_key_env: str, concurrency: int = 8,
                 max_retries: int = 4) -> None:
        from m3po_core.openai_http import RetryPolicy, read_api_key

        self.model, self.base_url, self.concurrency = model, base_url, concurrency
        self.name = f"openai:{model}"
        self.retry = RetryPolicy(max_retries=max_retries)
        self._api_key = read_api_key(api_key_env, base_url)

    def __repr__(self) -> str:
        return f"OpenAIVerifier(model={self.model!r}, base_url={self.base_url!r})"

    def verify(self, items: Sequence[Item]) -> list[Verdict | None]:
        import asyncio

        import openai

        from m3po_core.openai_http import (Budget, MalformedReply, describe_error, is_retryable, png_data_url,
                                           run_sync, with_retries)

        async def run() -> list[Verdict | None]:
            gate = asyncio.Semaphore(self.concurrency)
            async with openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0) as client:
                async def one(item: Item) -> Verdict | None:
                    messages = [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(item.image)}},
                        {"type": "text", "text": VERIFY_PROMPT.format(instruction=item.instruction,
                                                                      reference=item.reference,
                                                                      response=item.response)}]}]

                    async def attempt(budget: Budget) -> Verdict:
                        async with gate:
                            raw = await budget.client(client).chat.completions.with_raw_response.create(
                                model=self.model, messages=messages, temperature=0.0, max_tokens=120)
                        budget.took(raw)
                        choices = getattr(raw.parse(), "choices", None)  # none in a 200 that is not a completion
                        verdict = parse_verdict(choices[0].message.content or "") if choices else None
                        if verdict is None:
                            raise MalformedReply("no four-condition verdict in the reply")
                        return verdict

                    try:
                        return await with_retries(attempt, self.retry, f"verifier {item.prompt_id}", self._api_key)
                    except Exception as error:
                        if not isinstance(error, MalformedReply) and not is_retryable(error):
                            # a wrong key, model or request stops the shard instead of emptying it
                            raise RuntimeError(f"verifier {self.model} at {self.base_url or 'OpenAI'}: "
                                               f"{describe_error(error, self._api_key)}") from None
                        log.warning("verifier could not judge a response of %s: %s", item.prompt_id,
                                    describe_error(error, self._api_key))
                        return None  # recorded as not verified, never invented

                return list(await asyncio.gather(*(one(i) for i in items)))

        verdicts = run_sync(run)
        if items and all(v is None for v in verdicts):
            raise RuntimeError(f"verifier {self.model}: no response of {len(items)} could be judged (see the "
                               "warnings); the shard is not kept, so a re-run asks again")
        return verdicts


# ------------------------------------------------------------------ revisers

class ReferenceReviser:
    """The synthetic world's simulated reviser (see the module docstring)."""

    name = "reference"

    def __init__(self, fix_rate: float, reference_fix_rate: float, seed: int) -> None:
        self.fix_rate, self.reference_fix_rate, self.seed = fix_rate, reference_fix_rate, seed
        self._verifier = ReferenceVerifier()

    def feedback(self, items: Sequence[Item], with_reference: bool) -> list[str]:
        out = []
        for item, verdict in zip(items, self._verifier.verify(items)):
            problems = {"entailment": "the answer does not state what the question asks correctly",
                        "completeness": "details the question needs are missing",
                        "no_contradiction": "it states something the image contradicts",
                        "compliance": "it does not answer in the form the question asks for"}
            text = "; ".join(problems[c] for c in verdict.failed()) or "no critical deficiency"
            out.append(text + (f" (reference: {item.reference})" if with_reference else ""))
        return out

    def refine(self, items: Sequence[Item], feedbacks: Sequence[str], with_reference: bool) -> list[str]:
        rate = self.reference_fix_rate if with_reference else self.fix_rate
        return [item.reference if self.can_fix(item.prompt_id, rate) else item.response for item in items]

    def can_fix(self, prompt_id: str, rate: float) -> bool:
        """Whether this reviser can fix a prompt's answers: a property of the prompt (a hard sample
        stays hard for it), drawn once per prompt; a higher rate (the reference in the feedback step)
        fixes every prompt a lower one does, and more."""
        digest = hashlib.sha256(f"{self.seed}:{prompt_id}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < rate


class SamplerReviser:
    """Any sampler backend as the reviser: greedy answers to the feedback and refinement prompts."""

    def __init__(self, sampler, max_new_tokens: int, batch_size: int = 16) -> None:
        self.sampler, self.max_new_tokens, self.batch_size = sampler, max_new_tokens, batch_size
        self.name = f"{getattr(sampler, 'name', 'sampler')}-reviser"

    def feedback(self, items: Sequence[Item], with_reference: bool) -> list[str]:
        prompts = [FEEDBACK_PROMPT.format(instruction=i.instruction, response=i.response,
                                          reference=REFERENCE_LINE.format(reference=i.reference) if with_reference else "")
                   for i in items]
        return greedy_batched(self.sampler, [i.image for i in items], prompts, self.max_new_tokens, self.batch_size)

    def refine(self, items: Sequence[Item], feedbacks: Sequence[str], with_reference: bool) -> list[str]:
        prompts = [REFINE_PROMPT.format(instruction=i.instruction, response=i.response, feedback=f)
                   for i, f in zip(items, feedbacks)]
        return greedy_batched(self.sampler, [i.image for i in items], prompts, self.max_new_tokens, self.batch_size)


# ------------------------------------------------------------------ pairs

def round_pairs(responses: list[dict[str, Any]], seed: int, round_no: int) -> tuple[list[dict], list[dict], dict]:
    """(response pairs, feedback pairs, statistics) of one round's responses; a prompt with no
    verified response is listed in stats['unresolved']."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in responses:
        by_prompt[r["prompt_id"]].append(r)
    pairs, fb_pairs, unresolved, all_verified = [], [], [], 0
    origin_total: dict[str, int] = defaultdict(int)
    origin_verified: dict[str, int] = defaultdict(int)
    for pid in sorted(by_prompt):
        rows = sorted(by_prompt[pid], key=lambda r: r["resp_idx"])
        for r in rows:
            origin_total[r["origin"]] += 1
            origin_verified[r["origin"]] += bool(r["verified"])
        winners = [r for r in rows if r["verified"] is True]
        losers = [r for r in rows if r["verified"] is False]
        if not winners:
            unresolved.append(pid)
            continue
        if not losers:
            all_verified += 1
            continue
        rng = random.Random(f"{seed}:{round_no}:{pid}")
        w, l = rng.choice(winners), rng.choice(losers)
        pairs.append({"prompt_id": pid, "chosen": w, "rejected": l})
        # Feedback pairs (P^fb): two feedbacks on the same response text (samples often repeat), one
        # whose revision verified and one whose revision failed; feedback on different texts is no pair.
        text_of = {r["resp_idx"]: r["text"] for r in rows}
        good_fb = [r for r in winners if r["origin"] == "revised" and r["feedback"]]
        bad_fb = [r for r in losers if r["origin"] == "revised" and r["feedback"]]
        same = [(g, b) for g in good_fb for b in bad_fb if text_of.get(g["parent_idx"]) == text_of.get(b["parent_idx"])]
        if same:
            g, b = rng.choice(same)
            fb_pairs.append({"prompt_id": pid, "chosen": g, "rejected": b})
    stats = {"round": round_no, "prompts": len(by_prompt), "responses": len(responses), "pairs": len(pairs),
             "feedback_pairs": len(fb_pairs), "all_verified": all_verified, "unresolved": unresolved,
             "verified_rate": {o: origin_verified[o] / origin_total[o] for o in sorted(origin_total)}}
    return pairs, fb_pairs, stats
