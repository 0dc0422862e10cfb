"""The package logger, formatted like InternEvo's (MON-01)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s in %(funcName)s -- %(message)s"  # MON-01


def get_logger() -> logging.Logger:
    """The package logger, formatted like InternEvo's, writing to stdout."""
    logger = logging.getLogger("internevo_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
