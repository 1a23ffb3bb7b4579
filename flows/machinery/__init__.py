"""What the flows stand on: the shard fan-out, the pipelines' epilogue, the run log, and the Prefect
workarounds, each with its measured reason (flows/machinery/README.md)."""
