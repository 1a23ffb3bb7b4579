"""Prefect tasks: thin wrappers over `m3po_core.stages` adding run logging, names and tags."""
