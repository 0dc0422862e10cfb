"""InternEvo's AccPerplex training metrics (MT-01..04): the in-graph sums, the train step, and the log line."""

import functools
import math
import operator
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.data import loader
from internevo_jax.model import build_model
from internevo_jax.monitoring.metrics import (
    LINE_KEYS,
    PrintedSchedules,
    TgsStatistic,
    format_line,
    line_keys,
    parse_line,
)
from internevo_jax.ops.cross_entropy import (
    chunked_cross_entropy_with_metrics,
    cross_entropy,
    cross_entropy_with_metrics,
    metric_values,
)
from internevo_jax.optim import init_loss_scale, lr_schedule, make_optimizer
from internevo_jax.step import TrainState, make_train_step

TYPES = ["en", "cn", "code"]

# InternEvo v0.3.x's line from its 20B_demo.rst (step 1, message part): v0.3.4's keys, tgs/* included; its grad_norm
# is a dict per parameter group, ours one float (README, "Log line and files").
INTERNEVO_LINE = (
    "tflops=115.41412094522278 step=1 loss=11.33798599243164 tgs (tokens/gpu/second)=931.02 tgs/last_tgs_1=931.03 "
    "tgs/tgs_all=496.62 tgs/tgs_avg=634.83 tgs/tgs_SMA=496.62 tgs/last_tgs_10=0 tgs/last_tgs_50=0 "
    "lr=6.000000000000001e-07 loss_scale=65536.0 grad_norm={'0_default': 90.85008685328815, '1_fp32': 0.0} "
    "micro_num=4 num_consumed_tokens=131072 inf_nan_skip_batches=0 num_samples_in_batch=19 largest_length=2048 "
    "largest_batch=6 smallest_batch=3 adam_beta2=0.95 fwd_bwd_time=3.85 acc=0.0 perplexity=81555.5 acc/en=0.0 "
    "acc/cn=0.0 acc/code=0.0 tokens/en=60265 tokens/cn=0 tokens/code=0 loss_from_metric=11.309 loss/en=11.309 "
    "loss/cn=nan loss/code=nan"
)


def reference(logits, labels, type_ids, num_types):
    """AccPerplex / LossWithTypeId in float64 NumPy, written from InternEvo's code rather than ours."""
    logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    labels, type_ids = np.asarray(labels).ravel(), np.asarray(type_ids).ravel()
    valid = labels != -100
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(labels)), np.where(valid, labels, 0)]
    right = (logits.argmax(-1) == labels) & valid
    total = valid.sum()
    out = dict(
        acc=right.sum() / total,
        perplexity=np.exp(nll[valid].sum() / total),
        loss_from_metric=nll[valid].sum() / total,
    )
    with np.errstate(invalid="ignore"):
        for t in range(num_types):
            sel = valid & (type_ids == t)
            out[f"acc/{t}"] = right[sel].sum() / (sel.sum() + 1e-5)
            out[f"tokens/{t}"] = sel.sum()
            out[f"loss/{t}"] = nll[sel].sum() / sel.sum()
    return out


def compare(values, ref, num_types, rtol=1e-5):
    """Asserts the device ``metric_values`` equal the NumPy reference (nan where it is nan)."""
    assert values["acc"] == pytest.approx(ref["acc"], rel=1e-6)
    assert values["perplexity"] == pytest.approx(ref["perplexity"], rel=rtol)
    assert values["loss_from_metric"] == pytest.approx(ref["loss_from_metric"], rel=rtol)
    np.testing.assert_array_equal(values["type_tokens"], [ref[f"tokens/{t}"] for t in range(num_types)])
    np.testing.assert_allclose(values["type_acc"], [ref[f"acc/{t}"] for t in range(num_types)], rtol=1e-6)
    np.testing.assert_allclose(values["type_loss"], [ref[f"loss/{t}"] for t in range(num_types)], rtol=rtol)


def test_metric_sums_match_numpy():
    rng = np.random.default_rng(0)
    b, t, v, k = 3, 7, 11, 3
    logits = rng.normal(size=(b, t, v)).astype(np.float32)  # continuous draws: no ties for argmax
    labels = rng.integers(0, v, size=(b, t))
    labels = np.where(rng.random((b, t)) < 0.5, logits.argmax(-1), labels)  # many right predictions
    labels[:, -2:] = -100
    labels[0, :3] = -100
    type_ids = rng.integers(0, 2, size=(b, t))  # type 2 ("code") never occurs: tokens 0, acc 0, loss nan
    type_ids[1, -2:] = 2  # ...except on ignored tokens, which must not count

    loss_sum, count, sums = cross_entropy_with_metrics(
        jnp.asarray(logits), jnp.asarray(labels, jnp.int32), jnp.asarray(type_ids, jnp.int32), k, 0.1
    )
    values = jax.device_get(metric_values(sums))
    ref = reference(logits, labels, type_ids, k)
    assert 0.2 < ref["acc"] < 0.9 and ref["tokens/0"] > 0 and ref["tokens/1"] > 0  # the case is not degenerate
    compare(values, ref, k)
    assert values["type_tokens"][2] == 0 and values["type_acc"][2] == 0.0 and math.isnan(values["type_loss"][2])
    assert int(sums.right) == round(ref["acc"] * (labels != -100).sum())
    # The training loss keeps its label smoothing; the metric's CE does not (LossWithTypeId has none).
    plain_sum, plain_count = cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
    smooth_sum, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), 0.1)
    np.testing.assert_allclose(loss_sum, smooth_sum, rtol=1e-6)
    np.testing.assert_array_equal(count, plain_count)
    assert float(sums.nll) == pytest.approx(float(plain_sum.sum()), rel=1e-6)
    assert not np.allclose(smooth_sum, plain_sum)


def test_train_step_metrics_match_numpy_on_model_logits(tiny_config):
    cfg = tiny_config("loss.label_smoothing=0.1")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model_type, cfg.model, nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    # NumPy weights: jax.random would compile a sampler per shape, and any finite logits serve here.
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), nnx.to_pure_dict(abstract))
    tx = make_optimizer(cfg.adam, cfg.lr_scheduler, cfg.beta2_scheduler)
    dtype = config_lib.jax_dtype_name(cfg.model)
    state = TrainState(params, tx.init(params), init_loss_scale(cfg.grad_scaler, dtype), jnp.int32(0))
    source, types = loader.build_train_loader(cfg.data, dp_size=2)
    assert types == TYPES
    batch = dict(source[0]["batch"])  # [micro_num, rows, P]

    logits_fn = jax.jit(lambda p, tokens, pos, seg: nnx.merge(graphdef, p)(tokens, pos, seg))
    logits = np.stack(
        [
            np.asarray(logits_fn(params, batch["tokens"][m], batch["positions"][m], batch["segment_ids"][m]))
            for m in range(cfg.data.micro_num)
        ]
    )
    # Labels do not feed the logits: point about half of them at the model's argmax so accuracy is far from 0.
    labels = batch["labels"]
    batch["labels"] = np.where((rng.random(labels.shape) < 0.5) & (labels != -100), logits.argmax(-1), labels)
    batch["type_ids"] = rng.integers(0, 2, size=labels.shape).astype(np.int32)  # "code" stays empty
    ref = reference(logits, batch["labels"], batch["type_ids"], len(TYPES))

    step = jax.jit(make_train_step(cfg, graphdef, tx, len(TYPES)))
    _, metrics = step(state, {k: jnp.asarray(x, jnp.int32) for k, x in batch.items()})
    values = jax.device_get(metrics)

    assert 0.3 < ref["acc"] < 0.8 and ref["tokens/1"] > 0, ref
    compare(values, ref, len(TYPES), rtol=1e-4)
    assert values["type_tokens"][2] == 0 and math.isnan(values["type_loss"][2])
    assert values["type_tokens"].sum() == (batch["labels"] != -100).sum()
    # `loss` stays the label-smoothed mean of per-row means; the metric loss is plain CE, so they differ.
    assert abs(values["loss"] - values["loss_from_metric"]) > 0.01


def test_log_line_order_and_round_trip():
    all_keys = line_keys(TYPES)
    # Our keys are exactly InternEvo's, in its order: a dense model's line has no moe_loss; a MoE model's has it
    # between grad_norm and micro_num (LS-04).
    keys = tuple(k for k in all_keys if k != "moe_loss")
    positions = [INTERNEVO_LINE.find(f"{k}=") if i == 0 else INTERNEVO_LINE.find(f" {k}=") for i, k in enumerate(keys)]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(keys, positions, strict=True))
    assert INTERNEVO_LINE.count("=") == len(keys)
    assert set(LINE_KEYS) - {"moe_loss"} < set(keys)
    assert all_keys.index("grad_norm") + 1 == all_keys.index("moe_loss") == all_keys.index("micro_num") - 1

    # format_line orders any insertion order into InternEvo's; parse_line inverts it, nan included.
    values = {k: float(i) + 0.25 for i, k in enumerate(keys)}
    values.update({"step": 7, "tokens/en": 120836, "tokens/cn": 0, "tokens/code": 0, "loss/cn": float("nan")})
    # The type order comes from the tokens/ keys; everything else arrives reversed.
    shuffled = {f"tokens/{t}": values[f"tokens/{t}"] for t in TYPES} | dict(reversed(values.items()))
    line = format_line(shuffled)
    assert line.index(" acc=") < line.index(" perplexity=") < line.index(" acc/en=") < line.index(" acc/code=")
    assert line.index(" acc/code=") < line.index(" tokens/en=") < line.index(" tokens/code=")
    assert line.index(" tokens/code=") < line.index(" loss_from_metric=") < line.index(" loss/en=")
    assert line.endswith("loss/code=" + str(values["loss/code"]))
    parsed = parse_line(f"2026-01-01 00:00:00,000\tINFO train.py:1 in report -- {line}")
    assert list(parsed) == list(keys)
    for k in keys:
        assert parsed[k] == values[k] or (math.isnan(parsed[k]) and math.isnan(values[k])), k
    # And InternEvo's own line parses, but for its dict-valued grad_norm.
    theirs = INTERNEVO_LINE.replace("{'0_default': 90.85008685328815, '1_fp32': 0.0}", "90.85008685328815")
    parsed = parse_line(theirs)
    assert list(parsed) == list(keys) and parsed["tokens/en"] == 60265 and math.isnan(parsed["loss/code"])
    assert parsed["tgs/tgs_avg"] == 634.83 and parsed["tgs/last_tgs_10"] == 0 and parsed["lr"] == 6.000000000000001e-07


def test_tgs_statistic_is_internevos():
    stat = TgsStatistic()
    rng = np.random.default_rng(0)
    tokens = 8192 / 3  # per device, rounded to 4 places as InternEvo's tk_per_gpu
    tk = round(tokens, 4)
    seconds = rng.uniform(0.5, 2.0, size=120).tolist()
    last_1 = [round(tk / t, 2) for t in seconds]

    def running_sum(xs):  # InternEvo's `+=` sums; Python 3.12's sum() of floats is compensated (other last bits)
        return functools.reduce(operator.add, xs, 0.0)

    def rate(lo, hi):  # tokens / seconds of steps lo..hi-1, summed in order as InternEvo's running sums
        return running_sum([tk] * (hi - lo)) / running_sum(seconds[lo:hi])

    for n, t in enumerate(seconds, start=1):
        got = stat.update(tokens, t)
        assert list(got) == [k for k in LINE_KEYS if k.startswith("tgs/")]
        assert got["tgs/last_tgs_1"] == last_1[n - 1]
        assert got["tgs/tgs_all"] == round(rate(0, n), 2)
        assert got["tgs/tgs_avg"] == round(running_sum(last_1[:n]) / n, 2)
        # (InternEvo's moving sums subtract the step leaving the window, so the last digit may differ.)
        assert got["tgs/tgs_SMA"] == pytest.approx(rate(max(n - 50, 0), n), abs=0.0051)
        ten, fifty = n // 10 * 10, n // 50 * 50  # refreshed every 10 (50) steps, 0 (an int) before
        assert got["tgs/last_tgs_10"] == (round(rate(ten - 10, ten), 2) if ten else 0)
        assert got["tgs/last_tgs_50"] == (round(rate(fifty - 50, fifty), 2) if fifty else 0)
    assert TgsStatistic().values()["tgs/tgs_all"] == 0


def schedules(total=50000, warmup_ratio=0.01, init_steps=0, eta_min=1e-5, lr=1e-4, beta2=0.95, c=0):
    return PrintedSchedules(
        ml_collections.ConfigDict(dict(lr=lr)),
        ml_collections.ConfigDict(
            dict(total_steps=total, init_steps=init_steps, warmup_ratio=warmup_ratio, eta_min=eta_min)
        ),
        ml_collections.ConfigDict(dict(init_beta2=beta2, c=c)),
    )


def test_printed_lr_and_beta2_are_internevos_python_floats():
    s = schedules()
    # InternEvo's 20B_demo.rst lines, steps 0..5 (after 1..6 updates); float32 would print 4.000000053405728e-07.
    assert [repr(s.lr(k)) for k in range(1, 7)] == [
        "4.0000000000000003e-07",
        "6.000000000000001e-07",
        "8.000000000000001e-07",
        "1.0000000000000002e-06",
        "1.2000000000000002e-06",
        "1.4000000000000001e-06",
    ]
    assert repr(s.beta2(1)) == "0.95"  # not 0.949999988079071
    assert s.lr(500) == 1e-4 and s.lr(50000) == pytest.approx(1e-5)
    assert s.lr(3) == 8.000000000000001e-07  # going back replays the recursion from the start
    assert schedules(init_steps=5).lr(4) == 0 and repr(schedules(init_steps=5).lr(4)) == "0"
    with_c = schedules(beta2=0.9, c=0.5)
    assert with_c.beta2(4) == 0.9 and with_c.beta2(400) == 1 - (1 / 400**0.5) and with_c.beta2(0) == 0.9
    # The device's float32 schedule is the same function (optim.py), to float32 precision.
    cfg = dict(total=100, warmup_ratio=0.1, init_steps=5, eta_min=1e-5, lr=3e-4)
    device = lr_schedule(
        ml_collections.ConfigDict(dict(lr=cfg["lr"])),
        ml_collections.ConfigDict(dict(total_steps=100, init_steps=5, warmup_ratio=0.1, eta_min=1e-5)),
    )
    host = schedules(**cfg)
    for k in range(130):
        assert float(device(k)) == pytest.approx(host.lr(k), rel=2e-5, abs=1e-11), k


@pytest.mark.parametrize(
    "total, init_steps, warmup_ratio, eta_min, lr",
    [(2000, 0, 0.01, 1e-5, 1e-4), (100, 5, 0.1, 1e-5, 3e-4), (100, 5, 0.0, 1e-5, 1e-4), (60, 0, 0.0, 1e-5, 1e-3)],
)
def test_printed_lr_equals_torch_schedulers_digit_for_digit(total, init_steps, warmup_ratio, eta_min, lr):
    """InternEvo's FineTuneCosineAnnealingWarmupLR structure on torch's own schedulers (as of torch 2.1, InternEvo's
    pin: the cosine scheduler's epoch 0 keeps the optimizer's lr), past total_steps too."""
    torch = pytest.importorskip("torch")
    from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

    class WarmupThenCosine(LRScheduler):
        def __init__(self, opt):
            self.warmup_epochs = init_steps + int(total * warmup_ratio)
            self.after = CosineAnnealingLR(opt, total - self.warmup_epochs, eta_min=eta_min)
            self.finished = False
            super().__init__(opt)

        def get_lr(self):
            if self.last_epoch >= self.warmup_epochs:
                if not self.finished:
                    self.after.base_lrs, self.finished = self.base_lrs, True
                    self.after._get_lr_called_within_step = self.after._is_initial = True  # torch 2.1's epoch 0
                    try:
                        return self.after.get_lr()
                    finally:
                        self.after._is_initial = False
                return self.after.get_lr()
            if self.last_epoch >= init_steps:
                return [(self.last_epoch + 1 - init_steps) / int(total * warmup_ratio) * b for b in self.base_lrs]
            return [0 for _ in self.base_lrs]

        def step(self):
            if not self.finished:
                return super().step()
            self.after.step()

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = WarmupThenCosine(opt)
        ours = schedules(total, warmup_ratio, init_steps, eta_min, lr)
        for k in range(total + 30):
            assert repr(ours.lr(k)) == repr(opt.param_groups[0]["lr"]), k
            opt.step()
            scheduler.step()


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_dropout_masks_are_a_function_of_seed_and_batch_number(tiny_config, drop_rate):
    cfg = tiny_config(f"model.drop_rate={drop_rate}", f"model.attn_drop_rate={drop_rate}")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model_type, cfg.model, nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape), a.dtype), nnx.to_pure_dict(abstract))
    tx = make_optimizer(cfg.adam, cfg.lr_scheduler, cfg.beta2_scheduler)
    state = TrainState(params, tx.init(params), init_loss_scale(cfg.grad_scaler, "float32"), jnp.int32(0))
    source, _ = loader.build_train_loader(cfg.data, dp_size=2)
    batch = {k: jnp.asarray(x) for k, x in source[0]["batch"].items()}
    step = jax.jit(make_train_step(cfg, graphdef, tx, len(TYPES)))

    def loss(s):
        return float(step(s, batch)[1]["loss"])

    first = loss(state)
    assert loss(state) == first  # same state, same batch number: the same masks
    later = loss(state._replace(inf_nan_skips=jnp.int32(1)))  # the next batch number draws new masks
    assert (later != first) == (drop_rate > 0)


@pytest.mark.parametrize("chunk", [16, 24])  # 24 does not divide T = 64: the tail is padded with ignored tokens
def test_chunked_loss_equals_whole_rows_with_gradients(chunk):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 64, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    labels = jnp.asarray(np.where(rng.random((2, 64)) < 0.2, -100, rng.integers(0, 50, (2, 64))), jnp.int32)
    type_ids = jnp.asarray(rng.integers(0, 3, (2, 64)), jnp.int32)

    def logits_fn(h, w):
        return jnp.einsum("btd,dv->btv", h, w)

    def run(c):
        def loss(h, w):
            loss_sum, count, sums = chunked_cross_entropy_with_metrics(h, w, logits_fn, labels, type_ids, 3, 0.1, c)
            return (loss_sum / count).mean(), sums

        (value, sums), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, head)
        return value, sums, grads

    whole, chunked = run(0), run(chunk)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), chunked[1:], whole[1:])
    # The chunked graph never holds [B, T, V] logits: its largest fp32 intermediate is one [B, chunk, V] slice.
    jaxpr = jax.make_jaxpr(lambda h, w: run_loss_only(h, w, chunk, logits_fn, labels, type_ids))(hidden, head)
    assert all(np.prod(v.aval.shape) < 2 * 64 * 50 for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars)


def run_loss_only(h, w, chunk, logits_fn, labels, type_ids):
    return chunked_cross_entropy_with_metrics(h, w, logits_fn, labels, type_ids, 3, 0.0, chunk)[0].sum()
