"""Prefect flows: the M3PO DAG (`pipeline.m3po_pipeline`) and its stages (`stages`)."""
