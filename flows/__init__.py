"""Prefect flows (installed as `m3po.flows`): the M3PO DAG (`pipeline`), IPA's (`ipa`), the
experiment grid (`experiment`), the stage flows they are made of (`stage_flows`), the shard fan-out
(`fan_out`) and per-shard flows for GPU work pools (`shards`), the run's epilogue (`epilogue`) and
the command line (`cli`)."""
