"""Parsers of InternEvo's string-valued keys: ``data.skip_batches``, ``data.rampup_batch_size`` and storage paths."""

from __future__ import annotations

from collections.abc import Callable

from internevo_jax.config.errors import ConfigError


def parse_skip_batches(spec: str) -> list[tuple[int, int]]:
    """InternEvo's ``data.skip_batches`` ``"a-b,c"`` -> sorted inclusive spans; they must increase without overlap."""
    spans: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
            raise ConfigError(
                f"data.skip_batches={spec!r}: {part!r} is not 'N' or 'A-B' (batch indices, e.g. '0-99,150')"
            )
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a or (spans and a <= spans[-1][1]):
            raise ConfigError(f"data.skip_batches={spec!r}: spans must be increasing and non-overlapping ({part!r})")
        spans.append((a, b))
    return spans


def batch_skipper(spec: str) -> Callable[[int], bool]:
    """``batch_count -> skip?`` for ``data.skip_batches`` (T-05)."""
    spans = parse_skip_batches(spec)
    return lambda batch: any(a <= batch <= b for a, b in spans)


def parse_rampup(spec: str, micro_num: int) -> tuple[int, int, int] | None:
    """``data.rampup_batch_size`` ``"start incr every"`` -> (start, incr, every), or None when empty."""
    if not spec:
        return None
    parts = spec.split()
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"data.rampup_batch_size={spec!r}: expected 'start incr every', three positive integers")
    start, incr, every = map(int, parts)
    if start > micro_num:
        raise ConfigError(f"data.rampup_batch_size={spec!r}: start {start} exceeds data.micro_num {micro_num}")
    return start, incr, every


def local_path(path: str) -> str:
    """Strips InternEvo's ``local:`` prefix; other storage prefixes are not supported yet."""
    if path.startswith("local:"):
        return path[len("local:") :]
    for prefix in ("boto3:", "volc:", "oss2:", "s3:", "vc:", "ali:"):
        if path.startswith(prefix):
            raise ConfigError(f"checkpoint path {path!r}: storage prefix '{prefix}' is not supported yet (use local:)")
    return path
