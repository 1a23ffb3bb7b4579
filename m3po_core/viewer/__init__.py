"""The run viewer (`m3po view`): a read-only web application over a run's store (viewer/app.py),
reading it through plain functions (viewer/run_data.py, m3po_core/pair_query.py)."""
