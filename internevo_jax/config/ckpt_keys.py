"""The ``ckpt`` section's checks: saving, InternEvo's legacy load keys folded into ``load_ckpt_info``, paths."""

from __future__ import annotations

from typing import Any

from internevo_jax.config.errors import Checker, warn
from internevo_jax.config.parsers import local_path
from internevo_jax.config.schema import CKPT_CONTENTS, CKPT_TYPES, INF


def check_ckpt(ckpt: dict, need: Checker, info_given: bool) -> None:
    """Saving needs a folder and an interval; the legacy load keys become ``load_ckpt_info``; paths are checked
    now (an unsupported storage prefix fails before compiling). ``info_given``: the user set ``load_ckpt_info``."""
    if ckpt["enable_save_ckpt"]:
        need(
            ckpt["save_ckpt_folder"] is not None,
            "ckpt.enable_save_ckpt=True needs ckpt.save_ckpt_folder (or set ckpt.enable_save_ckpt=False)",
        )
        need(
            ckpt["checkpoint_every"] is not None and ckpt["checkpoint_every"] > 0,
            f"ckpt.enable_save_ckpt=True needs ckpt.checkpoint_every > 0, got {ckpt['checkpoint_every']}",
        )
    elif ckpt["checkpoint_every"] is None:
        ckpt["checkpoint_every"] = INF
    _convert_legacy_load_keys(ckpt, need, need.source, info_given=info_given)
    if ckpt["load_ckpt_info"] is not None:
        ckpt["load_ckpt_info"] = _check_load_ckpt_info(ckpt["load_ckpt_info"], need)
    if ckpt["max_to_keep"] is not None:
        need(ckpt["max_to_keep"] >= 1, f"ckpt.max_to_keep must be >= 1, got {ckpt['max_to_keep']}")
    freq = ckpt["oss_snapshot_freq"]
    need(
        freq == INF or (freq >= 0 and freq == int(freq)),
        f"ckpt.oss_snapshot_freq must be a whole number of steps (<= 1 or inf: no snapshots), got {freq}",
    )
    for key in ("save_ckpt_folder", "snapshot_ckpt_folder", "stop_file_path"):
        if ckpt[key] is not None:
            need(ckpt[key] != "", f"ckpt.{key} is empty; give a path or None")
            local_path(ckpt[key])


def _convert_legacy_load_keys(ckpt: dict, need: Any, source: str, info_given: bool) -> None:
    """InternEvo's legacy keys (CK-04) -> ``load_ckpt_info``: ``load_ckpt_folder`` loads (model, sampler, optimizer),
    or (model, sampler) with ``load_optimizer=False``; ``load_model_only_folder`` loads (model,);
    ``load_given_ckpt=True`` turns ``auto_resume`` off.

    The legacy keys are read only when ``load_ckpt_info`` is not given. InternEvo's ``7B_sft.py`` sets both, and
    InternEvo then uses ``load_ckpt_info`` and ignores the legacy key: so do we, saying so in one warning. A given
    ``load_ckpt_info=None`` means nothing to load here, and the legacy keys are ignored then too (InternEvo would
    fall back to them, which makes its own advice for a run from scratch, ``load_ckpt_info=None``, load the legacy
    folder of its ``7B_sft.py``).
    """
    full, model_only = ckpt["load_ckpt_folder"], ckpt["load_model_only_folder"]
    if full is not None or model_only is not None:
        if info_given or ckpt["load_ckpt_info"] is not None:
            legacy = " and ".join(
                f"ckpt.{key}={value!r}"
                for key, value in (("load_ckpt_folder", full), ("load_model_only_folder", model_only))
                if value is not None
            )
            info, as_internevo = ckpt["load_ckpt_info"], "as InternEvo ignores it beside load_ckpt_info"
            if info is None:
                why = f" to None (nothing to load), so the legacy {legacy} is ignored (InternEvo would load it)"
            elif "path" in info and info["path"] is None:
                why = f" with path=None (nothing to load), so the legacy {legacy} is ignored, {as_internevo}"
            else:
                why = f", so the legacy {legacy} is ignored, {as_internevo}"
            warn(f"{source}: ckpt.load_ckpt_info is set{why}; remove the legacy key to silence this warning")
        else:
            need(
                full is None or model_only is None,
                "set one of ckpt.load_ckpt_folder (legacy) and ckpt.load_model_only_folder (legacy), or "
                "ckpt.load_ckpt_info instead of both",
            )
            content = ("model",) if full is None else ("model", "sampler") + (("optimizer",) * ckpt["load_optimizer"])
            ckpt["load_ckpt_info"] = dict(path=full or model_only, content=content, ckpt_type="internevo")
        # The resolved config says what is loaded in one place (and loads again as it is, without a warning).
        ckpt["load_ckpt_folder"] = ckpt["load_model_only_folder"] = None
    if ckpt["load_given_ckpt"]:
        ckpt["auto_resume"] = False


def _check_load_ckpt_info(info: dict, need: Any) -> dict | None:
    """Normalises ``ckpt.load_ckpt_info`` (CK-04): a path, a content tuple (lower case), a known ckpt_type.
    ``path=None`` (InternEvo's ``demo.py``) means nothing to load, the same as ``load_ckpt_info=None``."""
    unknown = sorted(set(info) - {"path", "content", "ckpt_type"})
    need(not unknown, f"ckpt.load_ckpt_info has unknown keys {unknown}; valid: path, content, ckpt_type")
    if "path" in info and info["path"] is None:
        return None
    need(isinstance(info.get("path"), str) and info["path"], "ckpt.load_ckpt_info needs path='local:/folder'")
    content = info.get("content", ("model",))
    content = (content,) if isinstance(content, str) else tuple(content)
    content = tuple(c.lower() for c in content)
    bad = [c for c in content if c not in CKPT_CONTENTS]
    need(not bad, f"ckpt.load_ckpt_info.content has {bad}; valid: {CKPT_CONTENTS}")
    kind = info.get("ckpt_type", "internevo")
    need(kind in CKPT_TYPES, f"ckpt.load_ckpt_info.ckpt_type={kind!r} is unknown; valid: {CKPT_TYPES}")
    if kind in ("hf", "hf_llama", "llama"):
        need(content == ("model",), f"ckpt_type={kind!r} holds model weights only: set content=('model',)")
    return dict(path=info["path"], content=content, ckpt_type=kind)
