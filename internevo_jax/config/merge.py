"""Merging values onto the schema: a file's values, then ``--config.a.b=v`` overrides, each path and type checked.

An unknown key names the closest valid ones; a wrong type names the expected types and the default.
"""

from __future__ import annotations

import ast
import copy
import difflib
from typing import Any

from internevo_jax.config.errors import ConfigError, short
from internevo_jax.config.schema import K, Section, lookup


class BareFlag:
    """The value of a bare ``--config.a.b`` (True) or ``--noconfig.a.b`` (False): allowed for bool keys only, as
    ml_collections' own config flags allow them."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def parse_override(arg: str) -> tuple[str, Any]:
    """Parses ``--config.a.b=value`` (or ``config.a.b=value``) into ``("a.b", value)``.

    Values are Python literals (``4``, ``1e-4``, ``True``, ``None``, ``[2, 0]``, ``inf``) or ``dict(k=literal, ...)``
    as InternEvo configs write them, ``true``/``false`` in any case (absl's spelling); anything else is a string. A
    bare ``--config.a.b`` is ``True`` and ``--noconfig.a.b`` is ``False`` (bool keys only; see ``BareFlag``).
    ``parse_args`` joins the space form ``--config.a.b 3`` into ``--config.a.b=3`` before it gets here.
    """
    body = arg[2:] if arg.startswith("--") else arg
    if body.startswith("noconfig.") and "=" not in body:
        return body[len("noconfig.") :], BareFlag(False)
    if body.startswith("config.") and "=" not in body and len(body) > len("config."):
        return body[len("config.") :], BareFlag(True)
    if not body.startswith("config.") or "=" not in body:
        raise ConfigError(f"cannot parse override {arg!r}: expected --config.section.key=value")
    key, raw = body[len("config.") :].split("=", 1)
    if raw in ("inf", "+inf", "-inf"):
        return key, float(raw)
    if raw.strip().lower() in ("true", "false"):
        return key, raw.strip().lower() == "true"
    try:
        return key, _literal(ast.parse(raw.strip(), mode="eval").body)
    except (ValueError, SyntaxError):
        return key, raw
    except (RecursionError, MemoryError):
        # CPython's parser recurses once per nesting level (unary minus, brackets, operators); say what, not how.
        raise ConfigError(
            f"--config.{key}: the value ({len(raw)} characters, starting {raw[:20]!r}) is nested too deeply to "
            "parse; give a plain literal such as 4, 1e-4, 'text', [2, 0] or dict(k=v)"
        ) from None


def _literal(node: ast.expr) -> Any:
    """``ast.literal_eval`` plus ``dict(key=literal, ...)`` calls (nested too)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    return ast.literal_eval(node)


def dotted_keys(key: str, value: Any) -> set[str]:
    """``("ckpt", {"load_ckpt_info": None})`` -> ``{"ckpt", "ckpt.load_ckpt_info"}``: what an override sets."""
    keys = {key}
    if isinstance(value, dict):
        for k, v in value.items():
            keys |= dotted_keys(f"{key}.{k}", v)
    return keys


def normalize_shorthands(values: dict[str, Any]) -> dict[str, Any]:
    """``parallel=dict(tensor=2)`` -> ``parallel=dict(tensor=dict(size=2))`` (the ``Section`` shorthands)."""
    values = copy.deepcopy(values)
    for name, section in values.items():
        node = lookup(name)
        if not isinstance(section, dict) or not isinstance(node, dict):
            continue
        for key, value in section.items():
            sub = node.get(key)
            if isinstance(sub, Section) and isinstance(value, int) and not isinstance(value, bool):
                section[key] = {sub.shorthand: value}
    return values


def check_type(dotted: str, leaf: K, value: Any, source: str) -> Any:
    """``value`` if ``leaf`` accepts it (an int where the default is a float becomes a float), else ConfigError."""
    if value is None and (leaf.default is None or leaf.types is not None):
        return value
    types = leaf.expected_types()
    if types is None:
        return value
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(
            f"{source}: {dotted} expects {names} (default {leaf.default!r}), got {type(value).__name__} {short(value)}"
        )
    int_for_float = isinstance(value, int) and not isinstance(value, bool)
    if leaf.types is None and isinstance(leaf.default, float) and int_for_float:
        return float(value)  # lr=1 in a file means 1.0; keep the leaf's type stable
    return value


def unknown(dotted: str, options: list[str], source: str) -> ConfigError:
    """The error for a key the schema does not have, with the closest valid keys."""
    parent, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, options, n=3, cutoff=0.5)
    where = f"section '{parent}'" if parent else "the top level"
    hint = f"; did you mean: {', '.join((parent + '.' if parent else '') + c for c in close)}?" if close else ""
    return ConfigError(f"{source}: unknown key '{dotted}' in {where}{hint} (valid keys: {', '.join(sorted(options))})")


def _leaf(dotted: str, current: Any) -> K:
    # An InternEvo helper variable (SEQ_LEN) is not in the schema: its current value fixes its type.
    node = lookup(dotted)
    return node if isinstance(node, K) else K(current)


def merge(target: dict, values: dict, prefix: str, source: str, seen: dict[str, Any]) -> None:
    """Merges a file's ``values`` into ``target`` (the defaults); ``seen`` collects each dotted key set."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in target:
            if not prefix and key[:1].isupper():
                target[key] = value  # InternEvo helper variables (SEQ_LEN, HIDDEN_SIZE, DO_ALERT, ...)
                continue
            raise unknown(dotted, list(target), source)
        default = target[key]
        if isinstance(lookup(dotted), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted} must be a dict of {sorted(default)}, got {value!r}")
            merge(default, value, f"{dotted}.", source, seen)
            continue
        target[key] = check_type(dotted, _leaf(dotted, default), value, source)
        seen[dotted] = target[key]


def get(cfg: dict, dotted: str) -> Any:
    """The value at a dotted key."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def put(cfg: dict, dotted: str, value: Any) -> None:
    """Sets the value at a dotted key (no checks)."""
    *parents, key = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[key] = value


def set_override(cfg: dict, dotted: str, value: Any, source: str) -> None:
    """Sets one override, checking the path and the type."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if not isinstance(node, dict) or part not in node:
            raise unknown(here, list(node) if isinstance(node, dict) else [], source)
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {here} is a {type(node).__name__}, not a section")
    key = parts[-1]
    if not isinstance(node, dict) or key not in node:
        if len(parts) == 1 and key[:1].isupper():
            node[key] = value
            return
        raise unknown(dotted, list(node), source)
    default, schema = node[key], lookup(dotted)
    if isinstance(value, BareFlag):
        if bool not in (_leaf(dotted, default).expected_types() or ()) or isinstance(schema, dict):
            flag = "--noconfig" if not value.value else "--config"
            raise ConfigError(
                f"{flag}.{dotted}: no value given, and {dotted} is not a bool key (default {default!r}); give one: "
                f"--config.{dotted}=VALUE or --config.{dotted} VALUE"
            )
        value = value.value
    if isinstance(schema, Section) and isinstance(value, int) and not isinstance(value, bool):
        value = {schema.shorthand: value}
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted} is a section; set its keys ({', '.join(sorted(default))})")
        for k, v in value.items():
            set_override(cfg, f"{dotted}.{k}", v, source)
        return
    node[key] = check_type(dotted, _leaf(dotted, default), value, source)
