"""Loading a config: the file (either style) and ``--config.`` overrides onto the defaults, derived keys filled,
checked, locked; and the resolved config written back as JSON."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.config.checks import check_pipeline, finalize
from internevo_jax.config.errors import Checker, ConfigError, blame, short
from internevo_jax.config.files import read_config_file, resolve_config_path
from internevo_jax.config.merge import dotted_keys, get, merge, normalize_shorthands, parse_override, put, set_override
from internevo_jax.config.redaction import redact_config
from internevo_jax.config.schema import defaults, leaves

# (derived, source): the derived key follows its source unless the user set it to something else.
_DERIVED = tuple((key, leaf.follows) for key, leaf in leaves() if leaf.follows)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads a config file (either style), applies ``--config.a.b=v`` overrides and returns the validated config."""
    if path is not None:
        path = resolve_config_path(path)  # a shipped config's name: messages name the file it resolved to
    file_values = read_config_file(path) if path is not None else {}
    return build(file_values, [parse_override(o) for o in overrides], source=str(path))


def build(
    file_values: dict[str, Any], overrides: Sequence[tuple[str, Any]] = (), source: str = "config"
) -> ml_collections.ConfigDict:
    """Merges file values and parsed overrides onto the defaults, fills derived keys and validates."""
    cfg = defaults()
    explicit_file: dict[str, Any] = {}
    merge(cfg, normalize_shorthands(file_values), prefix="", source=source, seen=explicit_file)
    file_snapshot = copy.deepcopy(cfg)
    explicit_cli: set[str] = set()
    cli: dict[str, str] = {}  # dotted key -> the override that set it: an error about the key names the override
    for key, value in overrides:
        set_override(cfg, key, value, source=f"--config.{key}")
        explicit_cli.add(key)
        cli.update(dict.fromkeys(dotted_keys(key, value), f"--config.{key}={short(value)}"))
    for derived, src in _DERIVED:
        if derived in explicit_cli:
            continue
        # A file that sets the derived key to its source's value (7B_sft.py: total_steps=data["total_steps"]) means
        # "same as the source", so it follows a CLI override of the source.
        tied = derived not in explicit_file or explicit_file[derived] == get(file_snapshot, src)
        if tied:
            put(cfg, derived, get(cfg, src))
            if src in cli:
                cli[derived] = cli[src]  # lr_scheduler.total_steps=0 came from --config.data.total_steps=0
    given = set(explicit_file).union(*(dotted_keys(key, value) for key, value in overrides))
    finalize(cfg, Checker(source, cli), given)
    config = ml_collections.ConfigDict(cfg)
    config.lock()
    try:
        check_pipeline(config)
    except ConfigError as e:
        raise ConfigError(f"{blame(str(e), source, cli)}: {e}") from None
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (inf written as the string "inf", so the file stays valid JSON), secrets masked.

    Every copy of the config we write goes through here (the run's ``config.json``, the TensorBoard ``config`` text,
    each checkpoint's meta, ``--print_config``), so webhook and monitor addresses and URL credentials never reach a
    file in clear (``redaction.redact_config``: the rule the log lines use).
    """

    def enc(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: enc(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [enc(v) for v in value]
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value

    return json.dumps(enc(redact_config(config.to_dict())), indent=2, sort_keys=True)
