"""One training run, top to bottom: ``run(config)``, and the ``Trainer`` whose pieces it calls.

``run`` reads as the run happens: mesh -> data (this process's rows) -> model graph, abstract state and shardings ->
the start plan (``checkpoint.plan``; a finished run stops here) -> the checkpoint folder's lock, the run folder and
the AOT-compiled step -> the state, born sharded or restored (``checkpoint/start.py``) -> the loop (prefetching
loader, one-step-lagged metrics so the host never stalls the device, each step timed by ``step_clock``, async
checkpoints, SIGTERM / Ctrl-C -> checkpoint at an agreed step and a clean exit, ``interrupts.py``). The loop is
written with the public pieces a custom loop uses (``initial_state``, ``batches``, ``train_step``, ``log_step``,
``evaluate``, ``save_checkpoint``); ``initialize.py`` is InternEvo's facade over the same ``Trainer``. Ids such as
T-04 or D-11 in comments name the InternEvo behaviour kept (``docs/internevo_parity.md``).
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
from jax.sharding import Mesh

from internevo_jax import config as config_lib
from internevo_jax import mesh as mesh_lib
from internevo_jax.checkpoint.arrays import abstract_with_shardings
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.checkpoint.start import StateFactory, model_parts
from internevo_jax.checkpoint.stop_file import StopFile
from internevo_jax.data import loader, validation
from internevo_jax.errors import TrainingDiverged, run_folder_write
from internevo_jax.interrupts import Interrupts, new_summary, settle_pending_save, stop_message, summary_line
from internevo_jax.monitoring.alerts import Monitor
from internevo_jax.monitoring.logger import get_logger
from internevo_jax.monitoring.metrics import mfu, peak_tflops
from internevo_jax.monitoring.metrics_history import set_aside_rows
from internevo_jax.monitoring.profiler import Profiler
from internevo_jax.monitoring.reporter import Reporter
from internevo_jax.monitoring.step_clock import StepClock
from internevo_jax.ops.cross_entropy import metric_values
from internevo_jax.optim import make_optimizer
from internevo_jax.step import TrainState, make_eval_step, make_train_step


def run(config: ml_collections.ConfigDict, run_dir: Path | None = None, profiling: bool = False) -> dict[str, Any]:
    """Trains ``config`` (resolved, the cluster joined: ``initialize.initialize_distributed_env``) from wherever its
    checkpoints say to ``data.total_steps``; returns ``Trainer.fit``'s summary. Each phase is one line here."""
    mesh = mesh_lib.make_mesh(config.parallel)  # 1. the device mesh, built once: the loaders and the trainer share it
    train_dl, dataset_types = loader.train_loader(config, mesh)  # 2. data: this process's rows of every batch
    val_dls = loader.valid_loaders(config, mesh) if config.data.valid_every > 0 else {}
    # 3. model graph, optimizer, abstract state and shardings; 4. the start plan (nothing allocated or written yet)
    trainer = Trainer(
        config, run_dir, profiling, train_dl=train_dl, val_dls=val_dls, dataset_types=dataset_types, mesh=mesh
    )
    trainer.open_run()  # 5. the checkpoint folder's lock, the run folder's config.json, the compiled step
    return trainer.fit()  # 6. the state (restored or born sharded), then the loop to data.total_steps


class Trainer:
    """Mesh, abstract state and shardings, data and the start plan from one resolved config, with nothing written,
    locked or compiled yet (``open_run`` does that, called by ``initial_state`` and ``fit``); ``fit()`` runs the
    loop."""

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
        mesh: Mesh | None = None,
    ):
        """``model``, ``train_dl``, ``val_dls``, ``dataset_types`` and ``mesh`` default (None) to what the config
        builds (see ``TrainerBuilder``); ``val_dls={}`` means no validation sets. The loaders must be built on this
        mesh."""
        self.config = config
        self.profiling = profiling
        self.is_main = jax.process_index() == 0
        self.log = get_logger()
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.parallel)
        self.rules = mesh_lib.rules(config.parallel)
        self.dp, self.rows = mesh_lib.data_parallel_rows(self.mesh)
        self.world = self.mesh.size
        self.run_dir = run_dir or _run_dir(config)
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
        # What the run starts from (resume, load_ckpt_info or fresh), decided and checked before anything compiles.
        self.plan = self.states.plan()

        # Data: this process's rows of every batch.
        if train_dl is None:
            train_dl, types = loader.train_loader(config, self.mesh)
            dataset_types = dataset_types or types
        loader.check_rows("train_dl", getattr(train_dl, "rows", self.rows), self.rows, self.dp)
        self.source = train_dl
        self.dataset_types = list(dataset_types or loader.DATASET_TYPES)
        if val_dls is None and config.data.valid_every > 0:
            val_dls = loader.valid_loaders(config, self.mesh)
        for name, vs in (val_dls or {}).items():
            loader.check_rows(f"val_dls[{name!r}]", range(vs.dp_size), range(self.dp), self.dp)
        self.valid_sets = [vs for vs in (val_dls or {}).values() if vs.skip_reason is None]
        if config.data.valid_every <= 0:  # evaluate() still runs them on request
            if self.valid_sets and config.data.valid_folder is not None:
                self.log.info("data.valid_every is 0: fit() does not validate on data.valid_folder")
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.global_batch_shape = (config.data.micro_num, self.dp, config.data.packed_length)

        # The step: one jit, donated state; open_run compiles it ahead of time (``_step_for``) so it can never
        # retrace. A batch-size rampup (data.rampup_batch_size) adds one compiled program per ramp size, built when
        # first needed.
        step = make_train_step(config, self.graphdef, self.tx, len(self.dataset_types))
        self._jitted = jax.jit(
            step,
            in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=(self.shardings, mesh_lib.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._compiled: dict[int, Any] = {}
        self.compile_seconds = 0.0
        self._eval_step = jax.jit(
            make_eval_step(config, self.graphdef, len(self.dataset_types)),
            in_shardings=(self.shardings.params, self.batch_sharding),
            out_shardings=mesh_lib.replicated(self.mesh),
        )

        bubble = config_lib.check_pipeline(config)
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
        self.monitor = Monitor(config.monitor, config.JOB_NAME, self.run_dir, enabled=self.is_main)
        self._reporter: Reporter | None = None
        self._start_step_count = 0
        self._interrupts: Interrupts | None = None
        self._position = 0  # batches done, for the message of a run stopped at once
        self.state: TrainState | None = None  # after fit(): the final state
        self.checkpointer: Checkpointer | None = None
        self.stop_file: StopFile | None = None
        # An error path waits this long for a checkpoint still being written before it abandons it (None: no limit).
        self.pending_save_timeout: float | None = float(config.monitor.hang_timeout_seconds) or None

        # Decided before anything is written or compiled: a finished run has nothing to do (``open_run`` and ``fit``
        # then do nothing either).
        self.finished_at = self.states.finished_at(self.plan)
        if self.finished_at is not None:
            msg = "nothing to train: the newest checkpoint is at batch %d, data.total_steps is %d (nothing compiled, "
            self.log.info(msg + "nothing written)", self.finished_at, config.data.total_steps)
        self._opened = False

    def open_run(self) -> None:
        """What starting a run does outside this object, once (``run``, ``initial_state`` and ``fit`` call it; a
        second call does nothing): the checkpoint folder's lock first, so a run refused by a live one writes nothing
        into a shared folder; then the run folder's ``config.json``, the compiled step (before the state is made) and
        the stop file."""
        if self._opened or self.finished_at is not None:
            return
        config = self.config
        try:
            self.checkpointer = (
                Checkpointer(config.ckpt, job_name=config.JOB_NAME) if config.ckpt.enable_save_ckpt else None
            )
            if self.is_main:
                with run_folder_write(self.run_dir / "config.json"):
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    (self.run_dir / "config.json").write_text(config_lib.to_json(config))
            self._step_for(config.data.micro_num)
            self.stop_file = StopFile(config.ckpt.stop_file_path) if config.ckpt.stop_file_path else None
        except BaseException:
            if self.checkpointer is not None:
                self.checkpointer.close()  # frees the folder's lock for the next attempt
                self.checkpointer = None
            raise
        self._opened = True

    @property
    def train_step(self) -> Any:
        """The AOT-compiled train step for ``data.micro_num`` micro-batches: ``(state, batch) -> (state, metrics)``,
        the state donated (compiled by ``open_run``, or here on first use)."""
        return self._step_for(self.config.data.micro_num)

    def _step_for(self, micro_num: int) -> Any:
        """The AOT-compiled step for batches of ``micro_num`` micro-batches (other shapes are rejected, not traced)."""
        if micro_num not in self._compiled:
            shape = (micro_num,) + self.global_batch_shape[1:]
            batch = {f: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for f in loader.FIELDS}
            t0 = time.time()
            with mesh_lib.activate(self.mesh, self.rules):
                lowered = self._jitted.lower(abstract_with_shardings(self.abstract_state, self.shardings), batch)
                self._compiled[micro_num] = lowered.compile()
            if micro_num == self.config.data.micro_num:
                self.compile_seconds = time.time() - t0
                self.log.info(
                    "model %s: %.2fM params; train step compiled in %.1fs",
                    self.config.model_type,
                    self.num_params / 1e6,
                    self.compile_seconds,
                )
        return self._compiled[micro_num]

    # ------------------------------------------------------------------------------------------------------------
    def initial_state(self) -> tuple[TrainState, dict[str, Any]]:
        """The state the run starts from and its counters (``plan_start``); one log line says what and why.

        Rows an earlier attempt wrote to the run folder's ``metrics.jsonl`` for batches from the start on (a crashed
        branch) move to ``metrics.superseded.jsonl``, as TensorBoard drops that branch's events."""
        self.open_run()
        if self.checkpointer is None and self.config.ckpt.enable_save_ckpt:
            self.checkpointer = Checkpointer(self.config.ckpt, job_name=self.config.JOB_NAME)  # (nothing to train)
        state, meta = self.states.initial_state(self.plan, self.checkpointer)
        self._start_step_count = meta["step_count"]  # TensorBoard drops what a crashed run wrote past it
        if self.is_main:
            with run_folder_write(self.run_dir / "metrics.jsonl"):
                moved = set_aside_rows(self.run_dir / "metrics.jsonl", meta["batch_count"])
            if moved:
                self.log.info(
                    "metrics.jsonl: moved %d rows of batches >= %d written before the restart to %s",
                    moved,
                    meta["batch_count"],
                    self.run_dir / "metrics.superseded.jsonl",
                )
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
        def batch(i: int) -> Any:
            self.monitor.arm(f"validation on {vs.name}, batch {i}")
            return self._eval_step(params, self.to_device(vs.batch(i, self.rows)))

        total, sums = batch(0)  # a set that is not skipped has a batch (ValidSet.batch_rows > 0)
        for i in range(1, vs.num_batches):
            loss, batch_sums = batch(i)
            total, sums = total + loss, jax.tree.map(jnp.add, sums, batch_sums)
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
            data_parallel_size=self.dp,  # with data.micro_num: the micro-batches of a step (plan.check_data_unchanged)
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

        ``summary["stopped"]`` is None when the run reached ``total_steps``, else why it stopped early: "preempted"
        (SIGTERM), "interrupted" (Ctrl-C) or "stop_file"; ``summary["saved"]`` whether that step was checkpointed.
        Every exception is reported to the monitor (an alert with the traceback's tail) before it propagates, after
        the checkpoint being written, if any, is finished (or, past ``pending_save_timeout`` or on a second Ctrl-C,
        abandoned: its tmp folder is removed by the next start, which resumes from the newest complete one).
        """
        if self.finished_at is not None:  # (the constructor said so)
            return new_summary(self.finished_at, finished=True)
        self.open_run()
        interrupts = Interrupts(saves=self.checkpointer is not None)
        try:
            with interrupts:
                self._interrupts = interrupts
                return self._fit()
        except BaseException as e:
            if self.checkpointer is not None:
                self.monitor.disarm()  # waiting for a save is not a hang of the step
                settle_pending_save(self.checkpointer, e, self.pending_save_timeout, self._position)
            self.monitor.failure(e)
            raise
        finally:
            self._interrupts = None
            if self._reporter is not None:  # (closed already at a normal end)
                self._reporter.close()
            self.monitor.close()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        state, meta = self.initial_state()
        start = meta["batch_count"]
        consumed = meta["num_consumed_tokens"]
        summary = new_summary(start)
        self._position = start
        if start >= cfg.data.total_steps:  # (load_ckpt_info's sampler position, say)
            self.log.info(
                "nothing to train: the run is at batch %d of data.total_steps %d", start, cfg.data.total_steps
            )
            self.state = state
            self.close()
            return dict(summary, finished=True)
        it = self.batches(meta)
        skip = config_lib.batch_skipper(cfg.data.skip_batches)
        tokens_per_micro = cfg.data.packed_length * self.dp  # one micro-batch over all data-parallel rows
        reporter = self.reporter
        reporter.start(start)
        self.monitor.start(
            dict(model=cfg.model_type, params=self.num_params, mesh=dict(self.mesh.shape), run_folder=str(self.run_dir))
        )
        profiler = Profiler(self.run_dir / "traces", cfg.monitor, self.profiling, self.log)
        t_start, done = time.time(), start
        clock = StepClock()  # each step's own time, from a watcher thread: the loop never waits for it
        reports = _LaggedReports(self, clock, meta["step_count"], cfg.hybrid_zero_optimizer.max_consecutive_inf_nan)

        try:
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
                    state, metrics = self._step_for(micro_num)(state, self.to_device(item["batch"]))
                    clock.submit(batch_count, metrics)
                    consumed += micro_num * tokens_per_micro
                    summary["tokens"] += micro_num * tokens_per_micro
                    reports.push(batch_count, metrics, item["stats"], consumed, micro_num)
                    summary["steps"] += 1
                # T-04 on batches, not on step_count: deciding needs no host sync (equal unless batches were skipped).
                if self.valid_sets and cfg.data.valid_every > 0 and done % cfg.data.valid_every == 0:
                    reports.drain()
                    t_eval = time.time()
                    self.evaluate(state.params, done, reports.step_count)
                    clock.pause_ended()  # validation time is not the next step's time
                    summary["valid_seconds"] += time.time() - t_eval
                stop = self._checkpoint_point(done, state, it, consumed)
                self._position = done
                if stop is not None:
                    summary.update(stopped=stop, preempted=stop == "preempted", saved=self.checkpointer is not None)
                    break
            reports.drain()
        except BaseException:
            profiler.abandon()
            raise
        finally:
            clock.close()
        profiler.stop(state)
        if self.checkpointer is not None:
            self.checkpointer.close()
        reporter.close()
        if summary["stopped"] in ("preempted", "interrupted"):
            self.log.info("%s", stop_message(summary["stopped"], done, summary["saved"]))
        wall = time.time() - t_start
        tgs = summary["tokens"] / self.world / max(wall - summary["valid_seconds"], 1e-9)  # training time only
        kind = jax.devices()[0].device_kind
        peak = peak_tflops(kind, config_lib.jax_dtype_name(cfg.model))
        summary.update(
            end_step=done,
            finished=done == cfg.data.total_steps,
            wall_seconds=wall,
            tgs_mean=tgs,
            mfu=mfu(reporter.flops_per_token, tgs, peak),
        )
        self.log.info("%s", summary_line(summary, cfg.data.total_steps, kind))
        self.monitor.finish(summary)
        self.state = state
        return summary

    def _checkpoint_point(self, done: int, state: TrainState, it: Any, consumed: int) -> str | None:
        """After ``done`` batches: a checkpoint when due, on SIGTERM or Ctrl-C or when the stop file asks, else a
        snapshot when due. Returns "preempted", "interrupted" or "stop_file" when the run ends here, else None."""
        ck = self.checkpointer
        # Every step, on every process: it is their sync point for SIGTERM (and a Ctrl-C turned into one).
        signalled = self._interrupts.stop_reason(done) if self._interrupts is not None else None
        stop_file = self.stop_file
        request = stop_file.request(done) if stop_file is not None else None
        if ck is not None:
            regular = signalled is not None or request is not None or ck.due(done, self.config.data.total_steps)
            if regular or ck.snapshot_due(done):
                self.save_checkpoint(done, state, it, consumed, snapshot=not regular)
        if signalled is not None:
            saved = f"saving step {done}" if ck is not None else "nothing saved (ckpt.enable_save_ckpt=False)"
            self.monitor.notify(signalled, f"stopping at step {done}: {saved}")
            return signalled
        if request is not None and stop_file is not None:
            action, value = request
            saved = f"saved step {done}" if ck is not None else "nothing saved (ckpt.enable_save_ckpt=False)"
            message = f"stop file {stop_file.path} holds {value}: {saved}"
            if action == "exit":
                self.log.info("%s; exiting cleanly", message)
                self.monitor.notify("stopped", f"{message} and exited cleanly")
                return "stop_file"
            self.log.info(message)
        return None


class _LaggedReports:
    """Each step's metrics reported one step late, so fetching them never waits for the step just dispatched; a run
    of non-finite gradient steps longer than ``limit`` stops training (``TrainingDiverged``)."""

    def __init__(self, trainer: Trainer, clock: StepClock, step_count: int, limit: int):
        self._trainer, self._clock, self._limit = trainer, clock, limit
        self._pending: list[tuple[int, dict, dict, int, int]] = []
        self._bad_run = 0
        self.step_count = step_count  # optimizer steps of the newest reported step (validation logs it)

    def push(self, batch_count: int, metrics: dict, stats: dict, consumed_after: int, micro_num: int) -> None:
        """Queues a dispatched step and reports the one before it."""
        self._pending.append((batch_count, metrics, stats, consumed_after, micro_num))
        if len(self._pending) > 1:
            self._report(*self._pending.pop(0))

    def drain(self) -> None:
        """Reports every queued step (waits for them): before validation and at the end."""
        while self._pending:
            self._report(*self._pending.pop(0))

    def _report(self, batch_count: int, metrics: dict, stats: dict, consumed_after: int, micro_num: int) -> None:
        seconds = self._clock.seconds(batch_count)
        values = self._trainer.log_step(batch_count, metrics, stats, consumed_after, micro_num, seconds)
        self.step_count = int(values["step_count"])
        self._bad_run = 0 if values["finite"] else self._bad_run + 1
        if values["finite"]:
            return
        self._trainer.log.warning(
            "step %d: non-finite grad norm; update skipped (inf_nan_skip_batches=%d)",
            batch_count,
            int(values["inf_nan_skip_batches"]),
        )
        if self._bad_run >= self._limit:
            raise TrainingDiverged(
                f"steps {batch_count - self._bad_run + 1}..{batch_count} all had non-finite gradients (updates "
                f"skipped, loss_scale {float(values['loss_scale'])}); stopping instead of training on garbage. "
                "Check the data of those steps (tools/dump_batches.py), lower adam.lr, or use "
                "model.dtype='torch.bfloat16'; hybrid_zero_optimizer.max_consecutive_inf_nan sets the limit"
            )


def _run_dir(config: ml_collections.ConfigDict) -> Path:
    if config.run_folder is not None:
        return Path(config.run_folder)
    return Path("RUN") / config.JOB_NAME / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
