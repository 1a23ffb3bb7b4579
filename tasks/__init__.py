"""Prefect tasks (installed as `m3po.tasks`): thin wrappers over `m3po_core.stages` adding run
logging, names and tags. `stage_tasks` wraps M3PO's steps, `ipa_tasks` IPA's rounds."""
