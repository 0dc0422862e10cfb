"""What a run starts from, built on the mesh: the train state born sharded from the seed, restored from the run's own
checkpoint, loaded per ``ckpt.load_ckpt_info`` (ours, Hugging Face, Meta, InternEvo PyTorch) or from a given model's
weights. ``plan.py`` decides what (``plan_start`` / ``plan_load``, before anything compiles); this module builds it.

Everything starts from abstract shapes: the shardings come from the rules table, ``init`` and ``from_params`` are
jitted with those shardings as outputs, so no device ever holds more than its own slices.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from internevo_jax import config as config_lib
from internevo_jax import mesh as mesh_lib
from internevo_jax.checkpoint.arrays import abstract_with_shardings, array_names, read_arrays, read_meta
from internevo_jax.checkpoint.integrity import verify_step
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.checkpoint.plan import CONTENTS, StartPlan, content_of, plan_load, plan_start
from internevo_jax.checkpoint.step_folders import scan_steps
from internevo_jax.config import local_path
from internevo_jax.convert import hf_folder, meta_llama, torch_ckpt
from internevo_jax.model import build_model
from internevo_jax.monitoring.logger import get_logger
from internevo_jax.optim import init_loss_scale
from internevo_jax.step import TrainState, abstract_model, state_shardings

# load_ckpt_info sources holding model weights in another framework's layout: (what, reader(path, model section)).
FOREIGN = {
    "hf": ("Hugging Face folder", hf_folder.load_hf),
    "llama": ("Meta consolidated checkpoint", meta_llama.load_llama),
    "internevo_pt": ("InternEvo PyTorch checkpoint", torch_ckpt.load_internevo),
}


class StateFactory:
    """The train state's shapes and shardings for one config and mesh, and the ways to make it (see the module doc).

    ``weights`` (a pure params dict, e.g. a concrete model's) replace the seed's initial weights when given.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        rules: Any,
        abstract_params: nnx.State,
        weights: dict | None,
        tx: optax.GradientTransformation,
    ):
        self.config, self.mesh, self.rules, self.weights = config, mesh, rules, weights
        dtype = config_lib.jax_dtype_name(config.model)

        def init(key: jax.Array) -> TrainState:
            model = build_model(config.model_type, config.model, nnx.Rngs(params=key))
            params = nnx.to_pure_dict(nnx.state(model))
            return TrainState(params, tx.init(params), init_loss_scale(config.grad_scaler, dtype), jnp.int32(0))

        def from_params(params: dict) -> TrainState:
            params = jax.tree.map(lambda a: a.astype(jnp.float32), params)  # fp32 masters, whatever the file held
            return TrainState(params, tx.init(params), init_loss_scale(config.grad_scaler, dtype), jnp.int32(0))

        self.key = jax.random.key(config.seed)
        if weights is None:
            self.abstract_state = jax.eval_shape(init, self.key)
        else:
            self.abstract_state = jax.eval_shape(from_params, nnx.to_pure_dict(abstract_params))
        param_shardings = mesh_lib.param_shardings(abstract_params, mesh, rules)
        self.shardings = state_shardings(self.abstract_state, param_shardings)
        self.init = jax.jit(init, out_shardings=self.shardings)
        self.from_params = jax.jit(from_params, out_shardings=self.shardings)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

    def plan(self) -> StartPlan:
        """What the run starts from (``plan.plan_start``: resume, load or fresh), checked against this state now: a
        checkpoint that does not fit fails before minutes of compiling, naming each array and both shapes."""
        return plan_start(self.config, self.targets(), mesh_lib.data_parallel_size(self.mesh))

    def finished_at(self, plan: StartPlan) -> int | None:
        """The batch the run's own newest checkpoint is at when it is ``data.total_steps`` or more, so there is
        nothing left to train; else None. Decided before anything compiles or is written: a checkpoint named
        ``k`` holds the state after ``k`` batches, and its files must match their manifest (what restoring it
        would check first), so a corrupt or unverified final step still goes the usual way (``restore_latest``)."""
        if plan.source != "resume":
            return None
        ckpt = self.config.ckpt
        folder = Path(local_path(ckpt.save_ckpt_folder)).absolute()
        snapshots = Path(local_path(ckpt.snapshot_ckpt_folder or str(folder / "snapshot"))).absolute()
        found = [s for d in (folder, snapshots) for s in scan_steps(d)[0]]
        if not found:
            return None
        step, root = max(found, key=lambda x: x[0])
        if step < self.config.data.total_steps or verify_step(root) is not None:
            return None
        return step

    def initial_state(self, plan: StartPlan, checkpointer: Checkpointer | None) -> tuple[TrainState, dict[str, Any]]:
        """The state ``plan`` says the run starts from, and its counters; one log line says what and why."""
        log = get_logger()
        fresh = dict(batch_count=0, step_count=0, num_consumed_tokens=0, data_state=None)
        if plan.source == "resume":
            if checkpointer is None:  # plan_start resumes only with ckpt.enable_save_ckpt, which gives a run one
                raise ValueError("the start plan resumes the run's own checkpoint, but no checkpointer was passed")
            # The newest checkpoint whose checksums hold; a corrupt one is reported, moved aside and skipped.
            found = checkpointer.restore_latest(self.targets_tree(), partial=True)
            if found is not None:
                step, tree, meta = found
                restored = checkpointer.restored_from
                assert restored is not None  # restore_latest sets it whenever it returns a step
                arrays = array_names(tree)  # a converted checkpoint may hold the params only
                state = self.assemble(arrays)
                only = {content_of(n) for n in arrays} == {"model"}
                info = self.config.ckpt.load_ckpt_info
                log.info(
                    "auto_resume: restored %s step %d (batch_count=%d, step_count=%d%s)%s",
                    restored.parent,
                    step,
                    meta["batch_count"],
                    meta["step_count"],
                    "; it holds model weights only: fresh optimizer" if only else "",
                    f"; ckpt.load_ckpt_info ({info['path']}) not used: the run's own checkpoint comes first"
                    if info is not None
                    else "",
                )
                return state, meta
            why = f"ckpt.auto_resume found no usable checkpoint in {checkpointer.directory}"
            plan = plan_load(self.config, self.targets(), why, mesh_lib.data_parallel_size(self.mesh))
        if plan.source == "internevo":
            content = plan.content
            targets = {n: t for n, t in self.targets().items() if content_of(n) in content}
            saved = read_meta(plan.load_path())
            state = self.assemble(read_arrays(plan.load_path(), targets))
            meta = dict(fresh, step_count=int(state.opt_state.count))
            if "sampler" in content:
                meta.update({k: saved[k] for k in ("batch_count", "num_consumed_tokens", "data_state")})
            rest = [c for c in CONTENTS if c not in content]
            log.info(
                "load_ckpt_info: loaded %s from %s (ckpt_type internevo, saved after batch %s)%s; %s",
                ", ".join(content),
                plan.path,
                saved.get("batch_count"),
                f"; {', '.join(rest)} start fresh" if rest else "",
                plan.why,
            )
            return state, meta
        if plan.source in FOREIGN:
            what, read = FOREIGN[plan.source]
            params = read(plan.load_path(), self.config.model)
            # jax annotates tree.structure with an alias of jaxlib's PyTreeDef that mypy cannot resolve as a type.
            if jax.tree.structure(params) != jax.tree.structure(self.shardings.params):  # type: ignore[operator]
                raise config_lib.ConfigError(f"{plan.path}: the weights do not fit model_type={self.config.model_type}")
            with mesh_lib.activate(self.mesh, self.rules):
                state = self.from_params(self.place(params))
            log.info(
                "load_ckpt_info: loaded the model weights of the %s %s (optimizer, scheduler and sampler start "
                "fresh); %s",
                what,
                plan.path,
                plan.why,
            )
            return state, fresh
        if self.weights is not None:
            with mesh_lib.activate(self.mesh, self.rules):
                state = self.from_params(self.place(self.weights))
            log.info("starting from the given model's weights: %s, and no ckpt.load_ckpt_info", plan.why)
            return state, fresh
        log.info("initialising the train state from seed %d (compiling the init function)", self.config.seed)
        t0 = time.perf_counter()
        with mesh_lib.activate(self.mesh, self.rules):
            state = jax.block_until_ready(self.init(self.key))
        log.info(
            "starting from scratch (seed %d, %.1fs): %s, and no ckpt.load_ckpt_info",
            self.config.seed,
            time.perf_counter() - t0,
            plan.why,
        )
        return state, fresh

    def targets_tree(self) -> TrainState:
        """The abstract state with its shardings (what a restore fills)."""
        return abstract_with_shardings(self.abstract_state, self.shardings)

    def targets(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The state's arrays by checkpoint name (``params.norm.weight``, ...) as ShapeDtypeStructs with shardings."""
        return array_names(self.targets_tree())

    def assemble(self, arrays: dict[str, jax.Array]) -> TrainState:
        """A whole state from restored arrays (by name); the missing parts start fresh, as without a checkpoint.

        Fresh parts are computed inside one jit whose unused outputs XLA drops, so restoring Adam's moments never
        allocates zero moments first; the restored buffers are donated and passed through.
        """
        targets = self.targets()
        if arrays.keys() == targets.keys():
            return jax.tree.unflatten(jax.tree.structure(self.abstract_state), [arrays[n] for n in targets])
        param_names = [n for n in targets if content_of(n) == "model"]
        if self.weights is not None and not any(n in arrays for n in param_names):
            # The given model's weights stand in for the params the checkpoint does not hold.
            placed = array_names(self.place(self.weights))
            arrays = {**{f"params.{n}": a for n, a in placed.items()}, **arrays}
        has_params = all(n in arrays for n in param_names)
        params_def = jax.tree.structure(self.abstract_state.params)

        def assemble(restored: dict[str, jax.Array], key: jax.Array) -> TrainState:
            if has_params:
                fresh = self.from_params(jax.tree.unflatten(params_def, [restored[n] for n in param_names]))
            else:
                fresh = self.init(key)
            leaves = [restored.get(n, leaf) for n, leaf in array_names(fresh).items()]
            return jax.tree.unflatten(jax.tree.structure(fresh), leaves)

        with mesh_lib.activate(self.mesh, self.rules):
            return jax.jit(assemble, out_shardings=self.shardings, donate_argnums=(0,))(arrays, self.key)

    def place(self, params: dict) -> dict:
        """Host (or single-device) weights placed with the params' shardings: each device reads only its own slice,
        so a big model is never whole on one device."""

        def put(a: Any, sharding: jax.sharding.Sharding) -> jax.Array:
            return jax.make_array_from_callback(a.shape, sharding, lambda index: np.asarray(a[index]))

        return jax.tree.map(put, params, self.shardings.params)


def model_parts(config: ml_collections.ConfigDict, model: nnx.Module | None) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """Graph, abstract params and the starting weights (a pure dict, or None: initialise from the seed).

    No model: the one ``config.model_type`` names. An abstract model (``initialize_model``, ``nnx.eval_shape``) must
    be that one too, since its weights are created from the registered builder; a concrete model brings its own
    weights, which a restored checkpoint or ``load_ckpt_info`` still replaces.
    """
    graphdef, abstract = abstract_model(config)
    if model is None:
        return graphdef, abstract, None
    given_def, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        if given_def != graphdef or jax.tree.map(jnp.shape, state) != jax.tree.map(jnp.shape, abstract):
            raise config_lib.ConfigError(
                f"the abstract model given is not the one model_type={config.model_type!r} builds from the model "
                "section, so its weights cannot be created: pass a concrete model (its weights are the start) or "
                "register its builder with register_model and select it with model_type"
            )
        return graphdef, abstract, None
    return given_def, state, nnx.to_pure_dict(state)
