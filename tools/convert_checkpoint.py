"""Convert model weights between our orbax checkpoints and Hugging Face folders; read InternEvo's PyTorch
checkpoints and Meta's consolidated Llama weights.

    # ours -> HF (a run's checkpoint folder -> its newest verified step, or one step folder; --step picks another);
    # --tokenizer adds the training tokenizer (a SentencePiece .model, or an HF tokenizer folder)
    python tools/convert_checkpoint.py --src /ckpt/run1 --dst /models/run1-hf [--step 3000] [--dtype bfloat16] \
        [--tokenizer tokenizer.model]
    # HF -> ours: a checkpoint folder holding one step (the weights only), for ckpt.load_ckpt_info with
    # ckpt_type='internevo', content=('model',), or for auto_resume as the run's ckpt.save_ckpt_folder
    python tools/convert_checkpoint.py --src /models/Llama-2-7b-hf --dst /ckpt/llama2 --config=configs/llama2_7b.py
    # InternEvo PyTorch checkpoint (a step folder, or a save folder -> its newest step; --step picks another) or
    # Meta's consolidated.NN.pth + params.json -> ours (default) or HF (--dst_format hf); model weights only
    python tools/convert_checkpoint.py --src /ckpt/internevo/5000 --dst /ckpt/ours --config=configs/7B_sft.py
    python tools/convert_checkpoint.py --src /models/llama-2-7b --dst /models/llama-2-7b-hf --dst_format hf \
        --config=configs/llama2_7b.py

The direction follows the source (a folder with ``config.json`` is Hugging Face, ``model_tp0_pp0.pt`` or ``*.step``
InternEvo, ``consolidated.00.pth`` + ``params.json`` Meta; ``--src_format`` overrides). ``--config`` (plus
``--config.model.x=v`` overrides) gives the model section: for HF, InternEvo and Meta sources it is required and
checked against the source (``config.json``, ``model_config.pt``, ``params.json``, every tensor's shape); for
ours -> HF it defaults to the config the checkpoint was saved with. The output
is written into a temporary folder beside ``--dst`` and renamed onto it when complete, so ``--dst`` is never half
written; an existing non-empty ``--dst`` is refused unless ``--force`` (then it is replaced, also atomically). The
folders get the umask's permissions, as the files do.
Runs on the CPU: no accelerator needed. Exit codes: 0 done, 2 bad arguments or config, 3 checkpoint error.

An HF export is the ``transformers`` class of the model (``--layout llama``: Llama, Qwen2 or Gemma), or with
``--layout internlm3`` / ``baichuan2`` those remote-code layouts (``hf_config.INTERNLM2_EXPORT`` says why there is no
InternLM2 one), with the special-token ids in ``config.json`` and ``generation_config.json``
(``hf_layout.special_token_ids``: the tokenizer's, and the stop ids of the config's ``generation`` section).
``--tokenizer`` with a SentencePiece model writes a complete Hugging Face tokenizer
(``internevo_jax/convert/hf_tokenizer.py``) that ``AutoTokenizer`` loads and that encodes as training did (BOS +
pieces; checked against SentencePiece before anything is written); an HF tokenizer folder is copied.

Memory: the model is held at most once. To HF, our arrays are read one at a time and each HF tensor goes straight
into its shard file; to ours, the float32 masters are filled tensor by tensor from the source and orbax writes them
without a copy of its own. A progress bar (tensors, bytes, seconds per phase) goes to stderr: redrawn in place on a
terminal, a line per tenth otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.checkpoint import (
    folder_lock,
    plan,
    step_folders,
)
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.convert import (
    hf_config,
    hf_folder,
    hf_layout,
    hf_tokenizer,
    meta_llama,
    ours,
    torch_ckpt,
)
from internevo_jax.convert.detect import detect as detect_format
from internevo_jax.errors import (
    CheckpointError,
    ConvertError,
)
from internevo_jax.initialize import parse_args as parse_config_args
from internevo_jax.monitoring.logger import get_logger
from internevo_jax.step import abstract_model

FORMATS = ("auto", "internevo_jax", "hf")
FOREIGN = ("internevo", "llama")  # read only: InternEvo's PyTorch step folders, Meta's consolidated weights


def detect(src: Path) -> str:
    """The format of ``--src`` (``convert.detect.detect``), or a ``ConvertError`` naming the formats read."""
    if not src.is_dir():
        raise ConvertError(f"--src {src} does not exist or is not a folder")
    found = detect_format(src)
    if found is None:
        raise ConvertError(
            f"--src {src} is neither a Hugging Face folder (config.json + *.safetensors), an InternEvo checkpoint "
            "(model_tp*_pp*.pt), Meta's weights (consolidated.00.pth + params.json) nor one of our checkpoints (a "
            "step folder with state/ and meta/, or a folder of numbered step folders); give --src_format if it is"
        )
    return found


def step_folder(src: Path, step: int | None) -> Path:
    """The step folder to read: ``--step`` in ``src`` (or its snapshots), else the newest verified one."""
    if step is None:
        return plan.find_step(str(src))
    for folder in (src / str(step), src / "snapshot" / str(step)):
        if step_folders.is_step_dir(folder):
            return plan.find_step(str(folder))
    have = [s for s, _ in step_folders.step_dirs(src) + step_folders.step_dirs(src / "snapshot")]
    raise ConvertError(f"--step {step}: {src} has no such step folder; it has steps {sorted(have)}")


def saved_config(step_dir: Path) -> Any:
    """The model part of the config a checkpoint was saved with (model_type, model, and what validation needs)."""
    try:
        saved = ours.saved_config(step_dir)
    except CheckpointError as e:
        raise ConvertError(f"{e}; give --config=FILE for its model section") from e
    data = {k: saved["data"][k] for k in ("seq_len", "micro_bsz")}
    values = dict(model_type=saved["model_type"], model=saved["model"], data=data)
    keys = ("bos_id", "eos_id", "additional_eos_token_list")  # its special ids go into generation_config.json
    values["generation"] = {k: v for k, v in (saved.get("generation") or {}).items() if k in keys}
    return config_lib.build(values | dict(ckpt=dict(enable_save_ckpt=False)), source=f"{step_dir} (saved)")


class ProgressBar:
    """Conversion progress on stderr: tensors done / total, bytes, elapsed time, per phase (reading, writing).

    On a terminal one line redrawn with ``\\r`` (at most ~10 times a second); otherwise (a log file, CI) a line at
    every tenth of the bytes, so a log keeps a short record instead of thousands of redraws.
    """

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label: str | None = None

    def start(self, label: str, items: int | None, nbytes: int | None) -> None:
        self.finish()
        self.label, self.items, self.nbytes = label, items, nbytes
        self.done, self.done_bytes, self.t0, self.drawn, self.tenths = 0, 0, time.monotonic(), 0.0, 0

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.done_bytes += nbytes
        if self.tty:
            now = time.monotonic()
            if now - self.drawn >= 0.1 or self.done == self.items:
                self.drawn = now
                self.stream.write(f"\r{self.text()}\033[K")  # clear what a longer earlier line left
                self.stream.flush()
            return
        whole = self.nbytes or self.items  # unknown totals: no tenths, the closing line only
        part = self.done_bytes if self.nbytes else self.done
        tenths = part * 10 // whole if whole else 0
        if self.tenths < tenths < 10:  # the 100% line is finish()'s
            self.tenths = tenths
            print(self.text(), file=self.stream, flush=True)

    def finish(self) -> None:
        """Ends the phase's line (the closing state always printed once)."""
        if self.label is not None:
            self.stream.write(("\r" if self.tty else "") + self.text() + ("\033[K\n" if self.tty else "\n"))
            self.stream.flush()
            self.label = None

    def text(self) -> str:
        items = f"{self.done}/{self.items}" if self.items is not None else f"{self.done}"
        size = _size(self.done_bytes) + (f"/{_size(self.nbytes)}" if self.nbytes else "")
        pct = f" {100 * self.done_bytes // self.nbytes:3d}%" if self.nbytes else ""
        return f"{self.label}:{pct} {items} tensors, {size}, {time.monotonic() - self.t0:.1f}s"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def abstract_params(cfg: Any) -> dict[str, Any]:
    """The model's params as ShapeDtypeStructs (fp32 masters), nothing allocated."""
    return nnx.to_pure_dict(abstract_model(cfg)[1])


def saved_params(step_dir: Path, cfg: Any) -> dict[str, Any]:
    """The params of a step folder, read lazily (``ours.lazy_params``), checked against the config first."""
    return ours.lazy_params(step_dir, abstract_params(cfg))


def read_params(step_dir: Path, cfg: Any) -> dict[str, Any]:
    """The params of a step folder as numpy arrays, checked against the config by name and shape first."""
    return jax.tree.map(np.asarray, saved_params(step_dir, cfg))


def read_foreign(
    src: Path, src_format: str, cfg: Any, step: int | None, dtype: Any = None, progress: Any = None
) -> tuple[dict[str, Any], Path]:
    """``(params, the folder read)`` of an HF, InternEvo (PyTorch) or Meta source, checked against ``cfg``; arrays
    in ``dtype`` (default: the source's), each tensor cast as it is read."""
    if cfg is None:
        must_match = dict(hf=src / "config.json", internevo="its model_config.pt", llama=src / "params.json")
        raise ConvertError(
            f"--config=FILE is needed to read {src_format} weights: the config the run will train with (its model "
            f"section must match {must_match[src_format]}"
            + ("; hf_config.model_overrides(config) lists the values)" if src_format == "hf" else ")")
        )
    if src_format == "hf":  # checks every model.* key against config.json, every shape
        return hf_folder.load_hf(src, cfg.model, dtype, progress), src
    if src_format == "internevo":
        step_dir = torch_ckpt.find_step(src, step)
        return torch_ckpt.load_internevo(step_dir, cfg.model, dtype, progress), step_dir
    return meta_llama.load_llama(src, cfg.model, dtype, progress), src


def to_hf(
    src: Path,
    dst: Path,
    cfg: Any,
    step: int | None,
    dtype: str | None,
    layout: str,
    tokenizer: str | None,
    src_format: str = "internevo_jax",
    progress: Any = None,
) -> Path:
    """Writes the weights as an HF folder; ours are read one array at a time while the shards are written.

    ``tokenizer`` (a SentencePiece ``.model`` or an HF tokenizer folder) is prepared and checked before any weight
    is read, and written beside them (``hf_tokenizer``); its special-token ids go into the config files."""
    if layout == "internlm2":
        raise ConvertError(f"--layout {layout}: {hf_config.INTERNLM2_EXPORT}")
    step_dir = None
    if src_format == "internevo_jax":
        step_dir = step_folder(src, step)
        cfg = cfg or saved_config(step_dir)
    elif cfg is None:
        read_foreign(src, src_format, cfg, step)  # raises: foreign sources need --config
    tok = None
    if tokenizer is not None:
        try:
            tok = hf_tokenizer.load(config_lib.local_path(tokenizer), cfg.model.max_position_embeddings)
        except hf_tokenizer.TokenizerError as e:
            raise ConvertError(f"--tokenizer: {e}") from e
    try:  # before any weight is read: the family's HF class must compute the model's function
        hf_config.export_architecture(cfg.model, layout)
    except ValueError as e:
        raise ConvertError(f"--layout {layout}: {e}") from e
    if step_dir is not None:
        params = saved_params(step_dir, cfg)
    else:
        params, step_dir = read_foreign(src, src_format, cfg, step, progress=progress)
    token_ids = hf_layout.special_token_ids(cfg.generation, tok)

    def write(tmp: Path) -> None:
        out = tmp / "out"
        hf_layout.save_hf(params, cfg.model, out, layout=layout, dtype=dtype, progress=progress, token_ids=token_ids)
        if tok is not None:
            tok.save(out)
        out.rename(tmp / "final")

    atomic_folder(dst, write)
    return step_dir


def to_ours(src: Path, dst: Path, cfg: Any, step: int | None, src_format: str = "hf", progress: Any = None) -> Path:
    """Writes the weights as one of our checkpoints, at step ``step`` (default 0) for an HF or Meta source; for an
    InternEvo source ``step`` picks the step read and the output is step 0 (a weights-only start). Returns the
    folder read.

    The float32 masters are filled tensor by tensor as the source is read, and orbax writes them from our numpy
    arrays without copying them (``borrow_host_arrays``), so the conversion holds the model once, in float32."""
    params, read = read_foreign(src, src_format, cfg, step, np.float32, progress)
    state = {"params": params}
    step = 0 if step is None or src_format == "internevo" else step
    meta = dict(
        batch_count=0,
        step_count=0,
        num_consumed_tokens=0,
        data_state=None,
        config=config_lib.to_json(cfg),
        converted_from=str(read.absolute()),
    )

    def write(tmp: Path) -> None:
        ckpt = config_lib.default_config().ckpt
        ckpt.update(dict(save_ckpt_folder=str(tmp / "final"), checkpoint_every=1))
        writer = Checkpointer(ckpt, job_name="convert_checkpoint", borrow_host_arrays=True)
        leaves = jax.tree.leaves(state)
        if progress is not None:
            progress.start("writing the checkpoint", len(leaves), sum(a.nbytes for a in leaves))
        try:
            writer.save(step, state, meta)
        finally:
            writer.close()  # waits for the async write and the manifest; releases the folder's lock
        for a in leaves if progress is not None else ():
            progress.advance(a.nbytes)  # orbax writes them all in one go: the phase ends at once

    atomic_folder(dst, write)
    return read


WRITER = "writer.json"  # in a conversion's tmp folder: the process writing it (folder_lock.this_process)


def remove_stale_tmp(dst: Path) -> None:
    """Removes the ``.<dst>.tmp-*`` folders of killed conversions to ``dst`` (a whole model's size each), logging
    each; one whose writer may be alive (another host, or no record of it) is left, with a warning."""
    log = get_logger()
    for tmp in sorted(dst.parent.glob(f".{dst.name}.tmp-*")):
        try:
            gone = folder_lock.process_gone(json.loads((tmp / WRITER).read_text()))
        except (OSError, ValueError, AttributeError):
            gone = None
        if gone:
            log.info(f"removing {tmp}: left by a conversion to {dst} that was killed")
            shutil.rmtree(tmp, ignore_errors=True)
        elif gone is None:
            log.warning(f"{tmp} was left by a conversion to {dst} that may still run elsewhere; remove it if not")


def atomic_folder(dst: Path, write: Any) -> None:
    """Runs ``write(tmp)``, which must leave the result in ``tmp/final``, then renames it onto ``dst``."""
    dst = dst.absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(dst)
    tmp = hf_config.make_dir_beside(dst, "tmp-")  # the umask's permissions, which "final" inside it gets too
    try:
        (tmp / WRITER).write_text(json.dumps(folder_lock.this_process()))  # lets a later run tell it is ours, dead
        write(tmp)
        if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()
        if not (dst.exists() or dst.is_symlink()):
            os.rename(tmp / "final", dst)
            return
        os.rename(dst, tmp / "old")  # --force: the replaced output stays whole until the new one is in place
        try:
            os.rename(tmp / "final", dst)
        except BaseException:
            os.rename(tmp / "old", dst)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument(
        "--src", required=True, help="our checkpoint (a run's folder or a step folder), an HF, InternEvo or Meta folder"
    )
    parser.add_argument("--dst", required=True, help="the folder to write (refused if it exists and is not empty)")
    parser.add_argument("--src_format", default="auto", choices=FORMATS + FOREIGN, help="default: detected")
    parser.add_argument("--dst_format", default="auto", choices=FORMATS, help="default: the other format")
    parser.add_argument("--config", default=None, help="config .py file for the model section (see above)")
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="ours or InternEvo -> *: the step read (default: the newest complete one); HF or Meta -> ours: the step "
        "to write (default 0)",
    )
    parser.add_argument("--dtype", default=None, help="HF output dtype, e.g. bfloat16 (default: float32 as saved)")
    parser.add_argument(
        "--layout",
        default="llama",
        choices=("llama", "internlm3", "baichuan2", "internlm2"),
        help="HF output layout: llama = the transformers class of the model (LlamaForCausalLM, Qwen2ForCausalLM or "
        "GemmaForCausalLM); internlm3 / baichuan2 = those remote-code layouts (internlm2 is refused, with the reason)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="* -> HF: the training tokenizer, a SentencePiece .model (written as a complete HF tokenizer) or an HF "
        "tokenizer folder (copied)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --dst")
    return parse_config_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, dst = Path(config_lib.local_path(args.src)), Path(config_lib.local_path(args.dst))
    t0 = time.time()
    try:
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.force:
            raise ConvertError(
                f"--dst {dst} exists and is not empty; choose a new folder, or pass --force to replace it"
            )
        if dst.absolute() == src.absolute() or dst.absolute() in src.absolute().parents:
            raise ConvertError(f"--dst {dst} would replace --src {src}; write somewhere else")
        src_format = detect(src) if args.src_format == "auto" else args.src_format
        dst_format = args.dst_format
        if dst_format == "auto":  # the other format; a foreign source becomes ours
            dst_format = "hf" if src_format == "internevo_jax" else "internevo_jax"
        if src_format == dst_format:
            raise ConvertError(f"--src and --dst are both {src_format}; nothing to convert")
        cfg = config_lib.load(args.config, args.overrides) if args.config else None
        if args.overrides and cfg is None:
            raise ConvertError("--config.* overrides need --config=FILE")
        bar = ProgressBar()
        try:
            if dst_format == "hf":
                used = to_hf(src, dst, cfg, args.step, args.dtype, args.layout, args.tokenizer, src_format, bar)
            else:
                if args.dtype not in (None, "float32"):
                    raise ConvertError("our checkpoints hold float32 master weights; --dtype applies to HF output only")
                if args.tokenizer is not None or args.layout != "llama":
                    raise ConvertError("--tokenizer and --layout apply to HF output only")
                used = to_ours(src, dst, cfg, args.step, src_format, bar)
        finally:
            bar.finish()
    except (ConvertError, config_lib.ConfigError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 3
    print(f"wrote {dst} ({dst_format}) from {used} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
