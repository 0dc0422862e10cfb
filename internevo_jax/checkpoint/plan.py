"""What a run starts from and when it stops: ``ckpt.auto_resume`` / ``ckpt.load_ckpt_info`` (InternEvo CK-03/CK-04)
and ``ckpt.stop_file_path`` (CK-07).

``plan_start`` decides, before anything is compiled, whether the run resumes its own checkpoint, loads parts of
another one (or a Hugging Face folder), or starts fresh, and checks that the checkpoint's arrays fit the config, so a
mismatch names every array and both shapes instead of failing minutes later inside orbax. The ``Trainer`` carries the
plan out (``Trainer.initial_state``) and logs one line saying what it loaded from where and why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax import config as config_lib
from internevo_jax.checkpoint.arrays import check_fits, read_meta, saved_arrays
from internevo_jax.checkpoint.integrity import UNVERIFIED, verify_step
from internevo_jax.checkpoint.step_folders import is_step_dir, quarantined, quarantined_message, scan_steps
from internevo_jax.config import local_path
from internevo_jax.convert import hf_config, hf_folder, meta_llama, torch_ckpt
from internevo_jax.convert.detect import detect
from internevo_jax.data.loader import parse_rampup
from internevo_jax.errors import CheckpointError, CheckpointMismatch
from internevo_jax.monitoring.logger import get_logger


@dataclass(frozen=True)
class StartPlan:
    """What a run starts from, decided before anything compiles (``plan_start`` / ``plan_load``).

    ``source``: ``resume`` (the run's own newest checkpoint), ``fresh`` (the seed), ``internevo`` (one of our
    checkpoints per ``load_ckpt_info``), or a foreign layout read by ``start.FOREIGN`` (``hf``, ``llama``,
    ``internevo_pt``). ``path``: the folder or step folder to read; ``content``: what of ours to load; ``why``: why
    nothing was resumed (for the start's log line).
    """

    source: str
    why: str = ""
    path: Path | None = None
    content: tuple[str, ...] = ()

    def load_path(self) -> Path:
        """``path`` for a plan that loads from one (all but ``fresh`` and ``resume``)."""
        if self.path is None:
            raise ValueError(f"a start plan with source={self.source!r} names no path to load from")
        return self.path


CONTENTS = ("model", "optimizer", "scheduler", "sampler")  # load_ckpt_info content; "all" is all four


def content_of(name: str) -> str:
    """Which ``load_ckpt_info`` content (InternEvo CK-04) an array of the train state belongs to.

    model: ``params.*``; optimizer: Adam's moments and its bias-correction count (``opt_state.inner_state.*``) and
    the loss scaler (``loss_scale.*``), as InternEvo's optimizer state dict holds its grad scaler; scheduler: the
    update counter the lr and beta2 schedules read (``opt_state.count``, with the injected values derived from it);
    sampler: ``inf_nan_skips`` (with the data-iterator state and counters of the JSON item).
    """
    if name.startswith("params."):
        return "model"
    if name.startswith(("opt_state.inner_state.", "loss_scale.")):
        return "optimizer"
    if name.startswith("opt_state."):
        return "scheduler"
    return "sampler"


def plan_start(config: ml_collections.ConfigDict, targets: dict[str, Any], dp: int | None = None) -> StartPlan:
    """Decides what the run starts from and checks that it fits ``targets`` (the state's arrays by name) and, with
    ``dp`` (this run's data-parallel size), that the data stream is the one the checkpoint was saved in.

    1. ``ckpt.auto_resume`` (with saving on) and a checkpoint in ``save_ckpt_folder`` or its snapshot folder:
       resume the newest (all of it), and ``load_ckpt_info`` is not used: a restart continues the run.
    2. Else ``ckpt.load_ckpt_info`` (``plan_load``).
    3. Else a fresh state from ``seed``.

    InternEvo (CK-03) ignores ``load_ckpt_info`` whenever auto_resume is on, even with nothing to resume, so a
    run meant to start from pretrained weights silently starts from scratch; here one config both starts from
    the weights and resumes after a failure.
    """
    ckpt = config.ckpt
    if not ckpt.enable_save_ckpt:
        return plan_load(config, targets, "ckpt.enable_save_ckpt=False, so there is no checkpoint to resume", dp)
    if not ckpt.auto_resume:
        return plan_load(config, targets, "ckpt.auto_resume=False", dp)
    folder = Path(local_path(ckpt.save_ckpt_folder)).absolute()
    snapshots = Path(local_path(ckpt.snapshot_ckpt_folder or str(folder / "snapshot"))).absolute()
    found: list[tuple[int, Path]] = []
    skipped: list[tuple[Path, str]] = []
    for d in (folder, snapshots):
        good, bad = scan_steps(d)
        found, skipped = found + good, skipped + bad
    found.sort(key=lambda x: -x[0])
    if not found:  # with a checkpoint, restore_latest reports the skipped entries (and moves them aside)
        aside = quarantined(folder) + quarantined(snapshots)
        if aside:  # an earlier start refused to train from scratch; a restart loop must not change that
            raise CheckpointError(quarantined_message(folder, aside))
        junk = "; ".join(f"{entry}: {why}, skipped" for entry, why in skipped)
        return plan_load(
            config, targets, f"ckpt.auto_resume found no checkpoint in {folder}" + (f" ({junk})" if junk else ""), dp
        )
    newest = found[0][1]
    try:
        saved = saved_arrays(newest)
    except Exception:  # unreadable: restore_latest reports it, moves it aside and falls back
        saved = None
    if saved is not None:
        held = {content_of(n) for n in saved}
        wanted = {n: t for n, t in targets.items() if content_of(n) in held}
        check_fits(newest, wanted, targets)
        check_data_unchanged(config, newest, dp, "ckpt.auto_resume", "--config.ckpt.auto_resume=False to start over")
    return StartPlan(source="resume")


# data keys that shape the training stream: which packs, in which order, in batches of which size. A checkpoint's
# data position (batch_count, the epoch order, consumed samples) only means the same thing under the same values.
# Not here: total_steps (a longer run continues the same stream), skip_batches (meant to change on a restart),
# num_worker and the validation keys (the stream is the same). micro_num and rampup_batch_size count micro-batches
# per data-parallel rank: they are compared times the data-parallel size (a step reads micro_num x dp packs), so a
# resume onto another mesh that keeps the global batch is the same stream.
DATA_STREAM_KEYS = (
    "type",
    "train_folder",
    "subset_name",
    "tokenizer_path",
    "content_name",
    "seq_len",
    "micro_bsz",
    "pack_sample_into_one",
    "use_packed_dataset",
    "min_length",
    "min_length_dict",
    "seed",
    "num_dummy_samples",
    "fixed_random_dataset_seqlen",
)


def _global_batches(data: dict, dp: int) -> tuple[int, tuple[int, ...]]:
    """Packs per step over all ranks, and the rampup in packs over all ranks (start, incr, every)."""
    ramp = parse_rampup(data["rampup_batch_size"], data["micro_num"]) if data["rampup_batch_size"] else None
    return data["micro_num"] * dp, () if ramp is None else (ramp[0] * dp, ramp[1] * dp, ramp[2])


def check_data_unchanged(
    config: ml_collections.ConfigDict, step_dir: Path, dp: int | None, what: str, start_over: str
) -> None:
    """Refuses to carry a checkpoint's data position over to a changed data stream (CheckpointError, exit code 3),
    naming each changed ``data.`` key with old -> new; ``ckpt.accept_data_change=True`` warns and goes on.

    The saved side is the step's meta: its config (as ``config.to_json`` wrote it, secrets masked, compared with this
    config through the same function) and its data-parallel size (a checkpoint from before it was saved is taken to
    have this run's). A checkpoint without a config, or without a key, is not compared on it.
    """
    try:
        meta = read_meta(step_dir)
        saved = json.loads(meta["config"])["data"]
    except Exception:  # an unreadable step is reported (and passed over) by the restore itself
        return
    now = json.loads(config_lib.to_json(config))["data"]
    changed = [f"data.{k} {saved[k]!r} -> {now[k]!r}" for k in DATA_STREAM_KEYS if k in saved and saved[k] != now[k]]
    if dp is not None and all(k in saved for k in ("micro_num", "rampup_batch_size")):
        saved_dp = meta.get("data_parallel_size", dp)
        try:
            (old_n, old_ramp), (new_n, new_ramp) = _global_batches(saved, saved_dp), _global_batches(now, dp)
        except config_lib.ConfigError:  # a saved rampup this version cannot read: compare the text
            old_n, new_n = saved["micro_num"] * saved_dp, now["micro_num"] * dp
            old_ramp, new_ramp = saved["rampup_batch_size"], now["rampup_batch_size"]
        if old_n != new_n:
            changed.append(
                f"data.micro_num x data-parallel size {saved['micro_num']} x {saved_dp} = {old_n} -> "
                f"{now['micro_num']} x {dp} = {new_n} packs per step"
            )
        if old_ramp != new_ramp:
            changed.append(
                f"data.rampup_batch_size {saved['rampup_batch_size']!r} -> {now['rampup_batch_size']!r}"
                + (f" (data-parallel size {saved_dp} -> {dp})" if saved_dp != dp else "")
            )
    if not changed:
        return
    consequence = (
        f"{what}: {step_dir} was saved with other data settings: {', '.join(changed)}. Its data position (batch "
        "count, epoch order, consumed samples) belongs to the old data stream, so resuming under the new one would "
        "repeat or skip samples and change every batch from here on, without an error"
    )
    if config.ckpt.accept_data_change:
        get_logger().warning(f"{consequence}; resuming anyway, as ckpt.accept_data_change=True asks")
        return
    raise CheckpointError(
        f"{consequence}. Restore the saved values, or {start_over}, or accept the change knowingly with "
        "--config.ckpt.accept_data_change=True"
    )


def plan_load(config: ml_collections.ConfigDict, targets: dict[str, Any], why: str, dp: int | None = None) -> StartPlan:
    """``ckpt.load_ckpt_info`` (CK-04): ckpt_type ``internevo`` is one of our checkpoints (a step folder, or a
    run's checkpoint folder -> its newest verified step) and restores the ``content`` parts, or an InternEvo
    PyTorch checkpoint (``model_tp{t}_pp{p}.pt`` files; source ``internevo_pt``, model weights only); ``hf`` /
    ``hf_llama`` a Hugging Face folder's model weights; ``llama`` Meta's consolidated weights. The PyTorch and HF
    sources are checked here (files present, ``config.json`` / ``params.json`` / ``model_config.pt`` against the
    config) without reading a tensor, so a wrong folder fails before minutes of compiling; ``start.FOREIGN``'s
    readers read them later. ``why``: why nothing is resumed."""
    info = config.ckpt.load_ckpt_info
    if info is None:
        return StartPlan(source="fresh", why=why)
    kind = info["ckpt_type"]
    path = Path(local_path(info["path"])).absolute()
    if kind in ("hf", "hf_llama"):
        try:
            folder = hf_folder.HFFolder(local_path(info["path"]))  # config.json and the tensor index, no tensor read
        except (config_lib.ConfigError, CheckpointError) as e:
            raise type(e)(f"{e}{_missing_hint(info, path)}") from None
        hf_config.check_config(folder.config, config.model, str(folder.folder / "config.json"))
        hf_folder.check_shapes(folder, config.model)  # from the safetensors headers: a wrong folder fails now
        return StartPlan(source="hf", path=Path(local_path(info["path"])), why=why)
    if not path.exists():
        raise CheckpointError(f"ckpt.load_ckpt_info: {path} does not exist{_missing_hint(info, path)}")
    if kind == "llama":
        meta_llama.check_llama(path, config.model)
        return StartPlan(source="llama", path=path, why=why)
    if kind != "internevo":
        raise config_lib.ConfigError(f"ckpt.load_ckpt_info.ckpt_type={kind!r} is not supported")
    content = CONTENTS if "all" in info["content"] else info["content"]
    if detect(path) == "internevo":  # PyTorch files; ours never hold any
        if tuple(content) != ("model",):
            raise config_lib.ConfigError(
                f"ckpt.load_ckpt_info: {path} is an InternEvo PyTorch checkpoint, of which only the model weights "
                f"can be read (content asks for {list(content)}): optimizer and sampler states of another framework "
                "do not carry over; set content=('model',)"
            )
        step = torch_ckpt.find_step(path)
        torch_ckpt.check_internevo(step, config.model)
        return StartPlan(source="internevo_pt", path=step, why=why)
    step_dir = find_step(info["path"], config.ckpt.restore_unverified)
    try:
        held = {content_of(n) for n in saved_arrays(step_dir)}
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read its array metadata ({e})") from e
    missing = [c for c in content if c not in held]
    if missing:
        raise CheckpointMismatch(
            f"ckpt.load_ckpt_info.content asks for {missing}, but {step_dir} holds only "
            f"{[c for c in CONTENTS if c in held]}; drop {missing} from content"
        )
    wanted = {n: t for n, t in targets.items() if content_of(n) in content}
    check_fits(step_dir, wanted, targets)
    if "sampler" in content:  # the data position is carried over: it must mean the same batches here
        check_data_unchanged(config, step_dir, dp, "ckpt.load_ckpt_info", "drop 'sampler' from its content")
    return StartPlan(source="internevo", path=step_dir, content=tuple(content), why=why)


def _missing_hint(info: dict[str, Any], path: Path) -> str:
    """What to do about a ``load_ckpt_info`` path that is not there (empty when it is)."""
    if path.exists():
        return ""
    given = local_path(info["path"])
    where = "" if Path(given).is_absolute() else f" ({given!r} is relative to the working directory {Path.cwd()})"
    return (
        f"{where}. Point ckpt.load_ckpt_info's path at the checkpoint to load, or, to start from scratch instead, "
        "set load_ckpt_info=None in the config's ckpt section (or pass --config.ckpt.load_ckpt_info=None)"
    )


def find_step(path: str | os.PathLike, allow_unverified: bool = False) -> Path:
    """A step folder, or a checkpoint root -> its newest verified step (its ``snapshot/`` steps included).

    Read-only (it may be another run's folder): a corrupt step, and an entry named like a step that is no
    checkpoint (a symlink, a half-deleted folder, a tmp folder: ``step_folders.step_problem``), is reported (naming
    the folder and why) and skipped, never moved.

    A newer step without ``manifest.json`` cannot be checked (a flipped bit would load silently): with a verified
    older step there, this raises ``CheckpointError`` naming both and the ways out, unless ``allow_unverified``
    (``ckpt.restore_unverified``), which takes the newest step with a warning. A root whose steps all lack a manifest
    (written by an older version) gives its newest step with a warning. A step folder named directly is taken as is.
    """
    p = Path(local_path(str(path))).absolute()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} does not exist or is not a folder")
    if p.name.endswith(".orbax-checkpoint-tmp") or ".corrupt-" in p.name:
        raise CheckpointError(f"{p} is an unfinished or rejected save, not a checkpoint; point at its parent folder")
    if is_step_dir(p):
        problem = verify_step(p)
        if problem not in (None, UNVERIFIED):
            raise CheckpointError(f"checkpoint {p} is corrupt: {problem}")
        return p
    log = get_logger()
    candidates = []
    for folder in (p, p / "snapshot"):
        good, skipped = scan_steps(folder)
        candidates += good
        for entry, why in skipped:
            log.warning(f"{entry} is not a checkpoint: {why}; skipped it")
    candidates.sort(key=lambda x: -x[0])
    unverified: list[Path] = []
    for _, step_dir in candidates:
        problem = verify_step(step_dir)
        if problem == UNVERIFIED and not allow_unverified:
            unverified.append(step_dir)
            continue
        if problem is None and unverified:
            raise CheckpointError(
                f"{p}: the newest step {unverified[0]} has no manifest.json, so its files cannot be checked (a save "
                f"killed before its manifest, or an older version's), while the older step {step_dir} is verified. "
                f"Point at {step_dir} to load the verified one, or set ckpt.restore_unverified=True "
                "(--config.ckpt.restore_unverified=True) to load the newest unchecked"
            )
        if problem in (None, UNVERIFIED):
            if problem == UNVERIFIED:
                log.warning(f"checkpoint {step_dir} has no manifest.json: loading it unverified")
            return step_dir
        log.error(f"checkpoint {step_dir} is not usable: {problem}; trying an older step")
    if unverified:  # no verified step at all (an older version's checkpoint): the newest, with a warning
        log.warning(f"checkpoint {unverified[0]} has no manifest.json: loading it unverified")
        return unverified[0]
    seen = sorted(x.name for x in p.iterdir())[:8]
    raise CheckpointError(
        f"{p} holds no usable checkpoint: expected a step folder (with state/ and meta/) or a folder of numbered "
        f"step folders (ckpt.save_ckpt_folder of a run); found {seen or 'nothing'}"
        + (" (every step there is corrupt, see the errors above)" if candidates else "")
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stop file (CK-07).
