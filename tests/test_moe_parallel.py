"""Expert parallelism (P-10) computes the 1-device MoE step: loss, moe_loss and grad_norm within 1e-5 relative (fp32)
for three steps on 8 fake CPU devices, with and without token drops, and the tokens travel by all-to-all.

Same harness as test_parallel.py (same init, same global batches), except that the 1-device reference runs the same
micro_num 4 x micro_bsz 1 geometry: a MoE layer gates each row's tokens as one group (an InternEvo rank's), so its
capacity, and which tokens it drops, depend on the row length and the micro_num <-> micro_bsz swap does not hold.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from internevo_jax import mesh as mesh_lib
from internevo_jax.model import build_model

from .test_parallel import BASE, SPLIT, STEPS, Layout, split_batches

MOE = ("model_type=MIXTRALMOE", "model.num_experts=8", "moe.top_k=2", "loss.moe_loss_coeff=0.1")
ROUTING = {
    "drops": ("moe.capacity_factor=0.5", "moe.min_capacity=0"),  # 32 tokens, 8 experts: 4 slots each for 8 choices
    "no drops": ("moe.drop_tokens=False",),
}
LAYOUTS = {
    "expert 2": ("parallel.expert.size=2",),
    "expert 4": ("parallel.expert.size=4",),
    "expert 8": ("parallel.expert.size=-1",),  # InternEvo's default: min(dp 8, 8 experts)
    "expert 4 x tensor 2": ("parallel.tensor.size=2",),  # dp 4: min(4, 8)
    "expert 4 x pipeline 2": ("parallel.pipeline.size=2",),  # the aux loss carried through the schedule
}


def run(layout, params, batches):
    state = jax.device_put(layout.init_state(params), layout.shardings)
    out = []
    for b in batches:
        state, metrics = layout.compiled(state, jax.device_put(b, layout.batch_sharding))
        out.append([float(metrics[k]) for k in ("loss", "moe_loss", "grad_norm")])
    return np.array(out)


_REFERENCES = {}


def reference(tiny_config, routing):
    if routing not in _REFERENCES:
        cfg = tiny_config(*BASE, *SPLIT, *MOE, *ROUTING[routing])
        model = build_model(cfg.model_type, cfg.model, nnx.Rngs(params=jax.random.key(0)))
        params = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
        batches = split_batches(cfg, STEPS)
        _REFERENCES[routing] = params, batches, run(Layout(cfg, jax.devices()[:1]), params, batches)
    return _REFERENCES[routing]


@pytest.mark.parametrize("routing", list(ROUTING))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_matches_one_device(tiny_config, name, routing):
    params, batches, ref = reference(tiny_config, routing)
    cfg = tiny_config(*BASE, *SPLIT, *MOE, *ROUTING[routing], *LAYOUTS[name])
    layout = Layout(cfg, jax.devices())
    ep = int(name.split()[1])
    assert layout.mesh.shape["expert"] == ep
    # the experts' weights live split over the expert axis: each device holds E / ep of them
    w1 = layout.shardings.params["layers"]["feed_forward"]["w1"]
    assert w1.shard_shape((2, 8, 64, 128))[1] == 8 // ep
    got = run(layout, params, batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"{name}, {routing}")
    assert ref[:, 1].min() > 0  # moe_loss is there to compare
    hlo = layout.compiled.as_text()
    assert "all-to-all" in hlo, "tokens should reach their experts' devices by all-to-all"


def test_expert_parallel_size_must_divide_the_data_parallel_ranks_and_the_experts(tiny_config):
    from internevo_jax.config import ConfigError

    cfg = tiny_config(*BASE, *SPLIT, *MOE, "parallel.expert.size=3")
    with pytest.raises(ConfigError, match=r"expert-parallel size 3 must divide the data-parallel size 8"):
        mesh_lib.make_mesh(cfg.parallel)


def test_dropless_path_under_expert_parallelism_is_the_capacity_paths_function(tiny_config):
    """moe_type MegaBlock-D on expert 4 gives the 1-device capacity path's numbers when that drops nothing."""
    params, batches, ref = reference(tiny_config, "no drops")
    cfg = tiny_config(*BASE, *SPLIT, *MOE, "model.moe_type=MegaBlock-D", "parallel.expert.size=4")
    got = run(Layout(cfg, jax.devices()), params, batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_checkpoint_restores_onto_another_expert_parallel_size(tiny_config, tmp_path):
    """Saved with expert 2, resumed with expert 8: step 3 equals the uninterrupted expert-2 run's (reshard on load)."""
    import json
    import shutil

    from internevo_jax import Trainer

    def train(folder, run, *layout):
        cfg = tiny_config(
            *MOE,
            *ROUTING["drops"],
            "data.total_steps=4",
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='local:{folder}'",
            "ckpt.checkpoint_every=3",
            f"run_folder='{tmp_path / run}'",
            *layout,
        )
        trainer = Trainer(cfg)
        summary = trainer.fit()
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return trainer, summary, {r["step"]: r for r in rows if "loss" in r}

    _, _, want = train(tmp_path / "ckpt", "golden", "parallel.expert.size=2")
    src = tmp_path / "ckpt"
    shutil.copytree(src, tmp_path / "resume", ignore=lambda d, _: ["4"] if d == str(src) else [])  # resume from 3
    trainer, summary, got = train(tmp_path / "resume", "resumed", "parallel.expert.size=-1")
    assert trainer.mesh.shape["expert"] == 8 and summary["start_step"] == 3 and sorted(got) == [3]
    for key in ("loss", "moe_loss", "grad_norm"):
        assert got[3][key] == pytest.approx(want[3][key], rel=1e-5), key
