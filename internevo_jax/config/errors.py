"""How the config speaks to the user: ``ConfigError`` (``launch.py`` exits 2 on it), warnings, and naming the source.

A message names the key, the place and the fix; the place is the ``--config.`` override that set the key when one
did (``blame``), else the config file.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# The package logger's name (monitoring configures its handler and format); the config only writes to it.
LOGGER = "internevo_jax"


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key, the place and the fix."""


def warn(message: str) -> None:
    """A warning on the package logger (the config loads on; the user should still hear about it)."""
    logging.getLogger(LOGGER).warning(message, stacklevel=2)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a pasted wall of text stays readable in an error)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


# A config key in an error message: a dotted name (data.micro_bsz), or a top-level name before "=" (JOB_NAME='').
_MESSAGE_KEY = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|\b[A-Za-z_]\w*(?==)")


def blame(message: str, source: str, cli: dict[str, str]) -> str:
    """Where the values an error message names came from: the ``--config.`` overrides that set them (a key's own,
    or the section's it lies in), else the config file ``source``."""
    named = []
    for key in _MESSAGE_KEY.findall(message):
        parts = key.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
        named += [cli[k] for k in prefixes if k in cli][:1]
    return ", ".join(dict.fromkeys(named)) or source


class Checker:
    """``need(cond, msg)`` for the checks: raises ``ConfigError`` prefixed with where the named keys came from."""

    def __init__(self, source: str, cli: dict[str, str] | None = None):
        self.source, self.cli = source, cli or {}

    def __call__(self, cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{blame(msg, self.source, self.cli)}: {msg}")
