"""The ``Trainer``: builds mesh, state, data and the compiled step from one config, and runs the loop (top to bottom).

Flow: mesh -> model graph + abstract state -> shardings -> state born sharded (or restored; ``start.py``) ->
AOT-compiled step -> loop (prefetching loader, one-step-lagged metrics so the host never stalls the device, async
checkpoints, SIGTERM -> checkpoint and clean exit). The loop is written with the public pieces a custom loop uses
(``initial_state``, ``batches``, ``train_step``, ``log_step``, ``evaluate``, ``save_checkpoint``).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax import initialize, pipeline
from internevo_jax import mesh as mesh_lib
from internevo_jax.checkpoint import Checkpointer, abstract_with_shardings
from internevo_jax.data import loader, validation
from internevo_jax.metrics import get_logger, mfu, peak_tflops
from internevo_jax.monitor import Monitor
from internevo_jax.ops.cross_entropy import metric_values
from internevo_jax.optim import (
    make_optimizer,
)
from internevo_jax.profiler import Profiler
from internevo_jax.reporter import Reporter
from internevo_jax.resume import StopFile
from internevo_jax.start import StateFactory, model_parts
from internevo_jax.step import TrainState, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row (``hybrid_zero_optimizer.max_consecutive_inf_nan``)."""


class Trainer:
    """Builds mesh, model, data and state from one resolved config; ``fit()`` runs the loop."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        run_dir: Path | None = None,
        profiling: bool = False,
        *,
        model: nnx.Module | None = None,
        train_dl: Any = None,
        val_dls: dict[str, validation.ValidSet] | None = None,
        dataset_types: list[str] | None = None,
    ):
        """``model``, ``train_dl``, ``val_dls`` and ``dataset_types`` default to what the config builds (see
        ``TrainerBuilder``)."""
        self.config = config
        self.profiling = profiling
        self.is_main = jax.process_index() == 0
        self.log = get_logger()
        self.mesh = mesh_lib.make_mesh(config.parallel)
        self.rules = mesh_lib.rules(config.parallel)
        self.dp, self.rows = initialize.data_parallel_rows(self.mesh)
        self.world = self.mesh.size
        self.run_dir = run_dir or _run_dir(config)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(config_lib.to_json(config))
        self.log.info(
            "mesh %s on %d %s device(s); run folder %s",
            dict(self.mesh.shape),
            self.world,
            jax.devices()[0].platform,
            self.run_dir,
        )

        # Model, optimizer, shardings: all from abstract shapes; nothing is allocated yet.
        self.graphdef, abstract_params, weights = model_parts(config, model)
        self.tx = make_optimizer(config.adam, config.lr_scheduler, config.beta2_scheduler)
        self.states = StateFactory(config, self.mesh, self.rules, abstract_params, weights, self.tx)
        self.abstract_state, self.shardings = self.states.abstract_state, self.states.shardings
        self.num_params = self.states.num_params

        # Data: this process's rows of every batch.
        if train_dl is None:
            train_dl, types = initialize.build_train_loader_with_data_type(config, self.mesh)
            dataset_types = dataset_types or types
        _check_loader_rows("train_dl", getattr(train_dl, "rows", self.rows), self.rows, self.dp)
        self.source = train_dl
        self.dataset_types = list(dataset_types or loader.DATASET_TYPES)
        if val_dls is None and config.data.valid_every > 0:
            val_dls = initialize.build_valid_loader_with_data_type(config, self.mesh)
        for name, vs in (val_dls or {}).items():
            _check_loader_rows(f"val_dls[{name!r}]", range(vs.dp_size), range(self.dp), self.dp)
        self.valid_sets = [vs for vs in (val_dls or {}).values() if vs.skip_reason is None]
        if config.data.valid_every <= 0:  # evaluate() still runs them on request
            if self.valid_sets and config.data.valid_folder is not None:
                self.log.info("data.valid_every is 0: fit() does not validate on data.valid_folder")
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.global_batch_shape = (config.data.micro_num, self.dp, config.data.packed_length)

        # The step: one jit, donated state, compiled ahead of time so it can never retrace. A batch-size rampup
        # (data.rampup_batch_size) adds one compiled program per ramp size, built when first needed.
        step = make_train_step(config, self.graphdef, self.tx, len(self.dataset_types))
        self._jitted = jax.jit(
            step,
            in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=(self.shardings, mesh_lib.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._compiled: dict[int, Any] = {}
        self._eval_step = jax.jit(
            make_eval_step(config, self.graphdef, len(self.dataset_types)),
            in_shardings=(self.shardings.params, self.batch_sharding),
            out_shardings=mesh_lib.replicated(self.mesh),
        )
        t0 = time.time()
        self.train_step = self._step_for(config.data.micro_num)
        self.compile_seconds = time.time() - t0
        self.log.info(
            "model %s: %.2fM params; train step compiled in %.1fs",
            config.model_type,
            self.num_params / 1e6,
            self.compile_seconds,
        )

        bubble = pipeline.check_config(config)
        if bubble:
            level = logging.WARNING if bubble > 0.5 else logging.INFO
            self.log.log(
                level,
                "pipeline %d stages x %d chunks, %d micro-batches: bubble %.0f%% of the schedule (more micro-batches "
                "shrink it)",
                config.parallel.pipeline.size,
                config.model.num_chunks,
                config.data.micro_num,
                100 * bubble,
            )
        self.checkpointer = (
            Checkpointer(config.ckpt, job_name=config.JOB_NAME) if config.ckpt.enable_save_ckpt else None
        )
        self.stop_file = StopFile(config.ckpt.stop_file_path) if config.ckpt.stop_file_path else None
        self.monitor = Monitor(config.monitor, config.JOB_NAME, self.run_dir, enabled=self.is_main)
        self._reporter: Reporter | None = None
        self._start_step_count = 0

    def _step_for(self, micro_num: int) -> Any:
        """The AOT-compiled step for batches of ``micro_num`` micro-batches (other shapes are rejected, not traced)."""
        if micro_num not in self._compiled:
            shape = (micro_num,) + self.global_batch_shape[1:]
            batch = {f: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for f in loader.FIELDS}
            with mesh_lib.activate(self.mesh, self.rules):
                lowered = self._jitted.lower(abstract_with_shardings(self.abstract_state, self.shardings), batch)
                self._compiled[micro_num] = lowered.compile()
        return self._compiled[micro_num]

    # ------------------------------------------------------------------------------------------------------------
    def initial_state(self) -> tuple[TrainState, dict[str, Any]]:
        """The state the run starts from and its counters (``resume.plan_start``); one log line says what and why."""
        state, meta = self.states.initial_state(self.checkpointer)
        self._start_step_count = meta["step_count"]  # TensorBoard drops what a crashed run wrote past it
        return state, meta

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch (numpy, ``[micro_num, rows, P]``) as global arrays on the mesh."""
        vocab = self.config.model.vocab_size
        top = int(batch["tokens"].max())
        if top >= vocab:
            raise ValueError(f"token id {top} >= model.vocab_size {vocab}: the data and the model disagree")
        impl = self.config.model.attn_impl
        # cuDNN's packed layout has a static number of segment slots; auto may pick cuDNN on a GPU.
        if impl == "cudnn" or (impl == "auto" and jax.default_backend() == "gpu"):
            seg = batch["segment_ids"]
            most = int(((seg[..., 1:] != seg[..., :-1]).sum(-1) + 1).max())
            if most > self.config.model.attn_max_segments:
                raise ValueError(
                    f"a packed row holds {most} segments but model.attn_max_segments is "
                    f"{self.config.model.attn_max_segments}; raise it (cudnn attention needs the bound)"
                )
        shape = (batch["tokens"].shape[0],) + self.global_batch_shape[1:]
        return {f: jax.make_array_from_process_local_data(self.batch_sharding, batch[f], shape) for f in loader.FIELDS}

    def evaluate(self, params: dict, batch_count: int, step_count: int) -> dict[str, dict[str, float]]:
        """Validation on every set (E-01/E-02): ``{name: {loss, acc, plex}}``, logged as InternEvo logs it.

        ``loss`` is the mean over the set's batches of each batch's loss, divided by ``n + 1e-6`` as InternEvo's;
        ``acc`` and ``plex`` are the ``AccPerplex`` ratios over all of the set's tokens on every rank.
        """
        results = {}
        with mesh_lib.activate(self.mesh, self.rules):
            for vs in self.valid_sets:
                if vs.skip_reason is None:
                    results[vs.name] = self._evaluate_set(vs, params, batch_count, step_count)
        return results

    def _evaluate_set(self, vs: validation.ValidSet, params: dict, batch_count: int, step_count: int) -> dict:
        total, sums = jnp.float32(0.0), None
        for i in range(vs.num_batches):
            self.monitor.arm(f"validation on {vs.name}, batch {i}")
            loss, batch_sums = self._eval_step(params, self.to_device(vs.batch(i, self.rows)))
            total = total + loss
            sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        total, values = jax.device_get((total, metric_values(sums)))
        result = dict(
            loss=float(total) / (vs.num_batches + 1e-6),
            acc=round(float(values["acc"]), 4),
            plex=round(float(values["perplexity"]), 4),
        )
        self.reporter.valid(batch_count, step_count, vs.name, result)
        return result

    # ------------------------------------------------------------------------------------------------------------
    # The pieces of a training loop, public for custom loops (``fit`` is written with them):
    #   state, meta = trainer.initial_state(); batches = trainer.batches(meta)
    #   state, metrics = trainer.train_step(state, trainer.to_device(next(batches)["batch"]))
    #   trainer.log_step(...); trainer.evaluate(...); trainer.save_checkpoint(...); trainer.close()

    def batches(self, meta: dict[str, Any]) -> Any:
        """An iterator of ``{"step", "batch", "stats"}`` items from batch ``meta["batch_count"]`` on (``meta`` from
        ``initial_state``); its ``get_state()`` goes into checkpoints so a resumed run reads the same batches."""
        return loader.iterate(self.source, self.config.data.num_worker, meta["data_state"])

    @property
    def reporter(self) -> Reporter:
        """Where steps and validation results go: the log line, ``metrics.jsonl``, TensorBoard (process 0)."""
        if self._reporter is None:
            self._reporter = Reporter(
                self.config,
                self.run_dir,
                self.dataset_types,
                self.dp,
                self.world,
                self.monitor,
                self._start_step_count,
                self.is_main,
            )
        return self._reporter

    def log_step(
        self, batch_count: int, metrics: dict, stats: dict, consumed_tokens: int, micro_num: int, seconds: float
    ) -> dict[str, Any]:
        """Logs one step's metrics (``train_step``'s output; waits for that step) as InternEvo does; returns them
        on the host. ``consumed_tokens``: tokens trained on so far; ``seconds``: the step's wall time."""
        values = jax.device_get(metrics)
        self.reporter.train(batch_count, values, stats, consumed_tokens, micro_num, seconds)
        return values

    def save_checkpoint(
        self, batches_done: int, state: TrainState, batches: Any, consumed_tokens: int, snapshot: bool = False
    ) -> None:
        """An async checkpoint of ``state`` after ``batches_done`` batches, with the data position of ``batches``
        (from ``self.batches``) and the counters, so a restart resumes exactly there."""
        if self.checkpointer is None:
            raise config_lib.ConfigError("save_checkpoint needs ckpt.enable_save_ckpt=True and ckpt.save_ckpt_folder")
        meta = dict(
            batch_count=batches_done,
            step_count=int(state.opt_state.count),
            num_consumed_tokens=consumed_tokens,
            data_state=batches.get_state(),
            config=config_lib.to_json(self.config),
        )
        self.checkpointer.save(batches_done, state, meta, snapshot=snapshot)

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes the log files and the monitor (``fit`` does it itself)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self._reporter is not None:
            self._reporter.close()
        self.monitor.close()

    def fit(self) -> dict[str, Any]:
        """Trains from the current position to ``data.total_steps``; returns a summary.

        Every exception is reported to the monitor (an alert with the traceback's tail) before it propagates.
        """
        try:
            return self._fit()
        except BaseException as e:
            self.monitor.failure(e)
            raise
        finally:
            self.monitor.close()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        state, meta = self.initial_state()
        start = meta["batch_count"]
        consumed = meta["num_consumed_tokens"]
        summary = dict(
            steps=0,
            tokens=0,
            start_step=start,
            wall_seconds=0.0,
            valid_seconds=0.0,
            preempted=False,
            tgs_mean=0.0,
            mfu=None,
        )
        if start >= cfg.data.total_steps:
            self.log.info(
                "nothing to train: the run is at batch %d and data.total_steps is %d", start, cfg.data.total_steps
            )
            self.state = state
            if self.checkpointer is not None:
                self.checkpointer.close()
            return summary
        it = self.batches(meta)
        skip = config_lib.batch_skipper(cfg.data.skip_batches)
        tokens_per_micro = cfg.data.packed_length * self.dp  # one micro-batch over all data-parallel rows
        reporter = self.reporter
        reporter.start(start)
        self.monitor.start(
            dict(model=cfg.model_type, params=self.num_params, mesh=dict(self.mesh.shape), run_folder=str(self.run_dir))
        )
        profiler = Profiler(self.run_dir / "traces", cfg.monitor, self.profiling, self.log)
        pending: list[tuple[int, dict, dict, int, int]] = []
        last_ready = time.time()
        t_start = time.time()
        bad_run, limit = 0, cfg.hybrid_zero_optimizer.max_consecutive_inf_nan
        step_count = meta["step_count"]

        def report(batch_count: int, metrics: dict, stats: dict, consumed_after: int, micro_num: int) -> None:
            nonlocal last_ready, bad_run, step_count
            now = time.time()
            seconds, last_ready = now - last_ready, now  # (the wait for that step's results is in the next one)
            values = self.log_step(batch_count, metrics, stats, consumed_after, micro_num, seconds)
            step_count = int(values["step_count"])
            bad_run = 0 if values["finite"] else bad_run + 1
            if not values["finite"]:
                self.log.warning(
                    "step %d: non-finite grad norm; update skipped (inf_nan_skip_batches=%d)",
                    batch_count,
                    int(values["inf_nan_skip_batches"]),
                )
                if bad_run >= limit:
                    raise TrainingDiverged(
                        f"steps {batch_count - bad_run + 1}..{batch_count} all had non-finite gradients (updates "
                        f"skipped, loss_scale {float(values['loss_scale'])}); stopping instead of training on garbage. "
                        "Check the data of those steps (tools/dump_batches.py), lower adam.lr, or use "
                        "model.dtype='torch.bfloat16'; hybrid_zero_optimizer.max_consecutive_inf_nan sets the limit"
                    )

        def drain() -> None:
            while pending:
                report(*pending.pop(0))

        for batch_count in range(start, cfg.data.total_steps):
            item = next(it)
            assert item["step"] == batch_count, (item["step"], batch_count)
            done = batch_count + 1
            profiler.before(batch_count, state)
            self.monitor.arm(f"train step {batch_count}")
            if skip(batch_count):  # T-05: the batch is read (the data order stays the same), nothing is trained
                self.log.info("Skip batch count: %d", batch_count)
            else:
                micro_num = item["batch"]["tokens"].shape[0]  # data.micro_num, or less during a rampup (D-11)
                step = self.train_step if micro_num == cfg.data.micro_num else self._step_for(micro_num)
                state, metrics = step(state, self.to_device(item["batch"]))
                consumed += micro_num * tokens_per_micro
                summary["tokens"] += micro_num * tokens_per_micro
                pending.append((batch_count, metrics, item["stats"], consumed, micro_num))
                if len(pending) > 1:
                    report(*pending.pop(0))
                summary["steps"] += 1
            # T-04 on batches, not on step_count: deciding needs no host sync (equal unless batches were skipped).
            if self.valid_sets and cfg.data.valid_every > 0 and done % cfg.data.valid_every == 0:
                drain()
                t_eval = time.time()
                self.evaluate(state.params, done, step_count)
                last_ready = time.time()  # validation time is not the next step's time
                summary["valid_seconds"] += last_ready - t_eval
            stop = self._checkpoint_point(done, state, it, consumed)
            if stop is not None:
                summary["preempted"] = stop == "preempted"
                break
        drain()
        profiler.stop(state)
        if self.checkpointer is not None:
            self.checkpointer.close()
        reporter.close()
        wall = time.time() - t_start
        tgs = summary["tokens"] / self.world / max(wall - summary["valid_seconds"], 1e-9)  # training time only
        kind = jax.devices()[0].device_kind
        peak = peak_tflops(kind, config_lib.jax_dtype_name(cfg.model))
        summary.update(wall_seconds=wall, tgs_mean=tgs, mfu=mfu(reporter.flops_per_token, tgs, peak))
        self.log.info(
            "done: %d steps (batches %d..%d), %d tokens, %.1fs (validation %.1fs), mean tgs %.1f, MFU %s",
            summary["steps"],
            start,
            batch_count,
            summary["tokens"],
            wall,
            summary["valid_seconds"],
            tgs,
            f"{summary['mfu']:.1%}" if summary["mfu"] is not None else f"n/a (no peak FLOP/s known for {kind!r})",
        )
        self.monitor.finish(summary)
        self.state = state
        return summary

    def _checkpoint_point(self, done: int, state: TrainState, it: Any, consumed: int) -> str | None:
        """After ``done`` batches: a checkpoint when due, on SIGTERM or when the stop file asks, else a snapshot when
        due. Returns "preempted" or "stop_file" when the run ends here, else None."""
        ck = self.checkpointer
        preempted = ck is not None and ck.reached_preemption(done)  # every step: it is the processes' sync point
        request = self.stop_file.request(done) if self.stop_file is not None else None
        if ck is not None:
            regular = preempted or request is not None or ck.due(done, self.config.data.total_steps)
            if regular or ck.snapshot_due(done):
                self.save_checkpoint(done, state, it, consumed, snapshot=not regular)
        if preempted:
            self.log.info("preemption: saved step %d; exiting cleanly", done)
            self.monitor.notify("preempted", f"saved step {done} and exited cleanly")
            return "preempted"
        if request is not None:
            action, value = request
            saved = f"saved step {done}" if ck is not None else "nothing saved (ckpt.enable_save_ckpt=False)"
            message = f"stop file {self.stop_file.path} holds {value}: {saved}"
            if action == "exit":
                self.log.info("%s; exiting cleanly", message)
                self.monitor.notify("stopped", f"{message} and exited cleanly")
                return "stop_file"
            self.log.info(message)
        return None


def _run_dir(config: ml_collections.ConfigDict) -> Path:
    if config.run_folder is not None:
        return Path(config.run_folder)
    return Path("RUN") / config.JOB_NAME / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _check_loader_rows(name: str, got: range, want: range, dp: int) -> None:
    if got != want:
        raise config_lib.ConfigError(
            f"{name} feeds data-parallel rows {got.start}..{got.stop - 1}, but this trainer's mesh has data-parallel "
            f"size {dp} and this process feeds rows {want.start}..{want.stop - 1}: build it with "
            "build_train_loader_with_data_type(config, trainer_mesh) / build_valid_loader_with_data_type"
        )


class TrainerBuilder(Trainer):
    """InternEvo's ``TrainerBuilder(model, train_dl, val_dls, config=..., profiling=..., dataset_types=...)``.

    ``model``: from ``initialize_model(config)`` (abstract) or any concrete ``nnx.Module`` of a registered kind
    (its weights are the start unless a checkpoint is restored); ``train_dl`` / ``val_dls`` from
    ``build_train_loader_with_data_type`` / ``build_valid_loader_with_data_type``. None builds what the config says.
    """

    def __init__(
        self,
        model: nnx.Module | None,
        train_dl: Any,
        val_dls: dict[str, validation.ValidSet] | None,
        config: ml_collections.ConfigDict,
        profiling: bool = False,
        dataset_types: list[str] | None = None,
        run_dir: Path | None = None,
    ):
        super().__init__(
            config,
            run_dir,
            profiling,
            model=model,
            train_dl=train_dl,
            val_dls=val_dls,
            dataset_types=dataset_types,
        )
