"""The pipeline's steps as plain functions over a `RunStore`: what the Prefect tasks wrap.
One module per DAG step; each reads the previous step's Parquet and writes its own, so nothing
passes between steps in memory and any step can be re-run, resumed or moved to another machine.

    prompts.py      1  prompts in shards (+ the synthetic world's held-out sets, benchmarks.py)
    base_models.py  2  the base policy and the CLIP encoder a run builds for itself
    sample.py       3  N candidates per prompt, per shard
    score.py        4  MAS per candidate (encoder + judge), per shard
    select.py       5  pairs: argmax MAS against argmax M3P-Score
    train.py        6  LoRA-DPO on the pairs
    evaluate.py     7  base against trained on the benchmarks
    ipa_round.py       IPA's rounds (sample, revise, verify, pair), in place of 3-5
    runner.py          the cache-key policy and the shard runner every step uses
"""
