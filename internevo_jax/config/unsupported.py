"""Keys InternEvo has that would change the model or the run but are not implemented here: their InternEvo default
loads (shipped InternEvo configs keep working); any other value is refused with the key, the value and what is
supported, instead of being silently ignored."""

from __future__ import annotations

from internevo_jax.config.errors import Checker


def check_unsupported(cfg: dict, need: Checker) -> None:
    """Refuses a non-default value of a key that is accepted but not implemented."""
