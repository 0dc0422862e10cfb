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
