import logging
import os

# Our loggers speak at INFO (model loads, storage retries); Prefect routes them into run logs when
# "m3po" is in PREFECT_LOGGING_EXTRA_LOGGERS, but copies only handlers, not a level.
logging.getLogger("m3po").setLevel(os.environ.get("M3PO_LOG_LEVEL", "INFO"))
