"""Prefect flows (installed as `m3po.flows`): the M3PO DAG (`pipeline`), IPA's (`ipa`), the
experiment grid (`experiment`), the stage flows they are made of (`stage_flows`), per-shard flows for
GPU work pools (`shards`) and the command line (`cli`, `cli_data`). What they stand on (the shard
fan-out, the report epilogue, Prefect workarounds) is in `machinery/` (its README says why each is there)."""
