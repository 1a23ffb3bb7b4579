"""Every log line of a command in a file of its run: `{run}/logs/{command}-{time}.log`.

Prefect's flow and task run logs and the loggers Prefect routes into them (PREFECT_LOGGING_EXTRA_LOGGERS)
go to the file as well as to the API; for a remote root the file is written locally and uploaded
when the command ends. Limit: a command killed with SIGKILL leaves a remote root without its log copy.
"""
from __future__ import annotations

import logging
import os
import time


class RunLog:
    """Every log record of a command (Prefect's flow and task run logs, the m3po and library loggers
    routed into them) also in a file in the run: `{run}/logs/{command}-{time}.log`. For a remote
    root the file is written locally and uploaded when the command ends (`close`)."""

    def __init__(self, root: str, run_id: str, command: str):
        import tempfile

        from m3po_core.store import RunStore

        self.store = RunStore(root, run_id)
        self.rel = f"logs/{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        if self.store.is_local:
            os.makedirs(os.path.dirname(self.store.path(self.rel)), exist_ok=True)
            self.local = self.store.path(self.rel)
        else:
            self.local = os.path.join(tempfile.mkdtemp(prefix="m3po-log-"), os.path.basename(self.rel))
        self.handler = logging.FileHandler(self.local, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        from prefect.logging.formatters import PrefectFormatter

        self.handler.setFormatter(PrefectFormatter(
            "%(asctime)s %(levelname)-7s %(name)s - %(message)s",
            flow_run_fmt="%(asctime)s %(levelname)-7s flow run %(flow_run_name)r - %(message)s",
            task_run_fmt="%(asctime)s %(levelname)-7s task run %(task_run_name)r - %(message)s"))
        # "prefect" carries the flow and task run loggers; the others are the loggers Prefect routes
        # into run logs (PREFECT_LOGGING_EXTRA_LOGGERS), which do not propagate through "prefect"
        extra = os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",")
        self.loggers = [logging.getLogger(n) for n in dict.fromkeys(["prefect", *extra]) if n.strip()]
        for logger in self.loggers:
            logger.addHandler(self.handler)

    def close(self) -> str:
        """Detach, publish (remote roots) and return where the log is."""
        for logger in self.loggers:
            logger.removeHandler(self.handler)
        self.handler.close()
        if self.store.is_local:
            return self.local
        try:
            with open(self.local, "rb") as f:
                self.store.write_bytes(self.rel, f.read())
            return self.store.url(self.rel)
        except Exception as e:  # the run's result stands without its log copy
            return f"{self.local} (not uploaded to {self.store.url(self.rel)}: {type(e).__name__})"
