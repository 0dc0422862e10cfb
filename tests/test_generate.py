"""Generation (G-01..G-06): KV-cache greedy = full-forward argmax per family, batch invariance, EOS, the logit
filters on hand-made logits, dynamic NTK per row, transformers' generate on an HF folder (llama3 RoPE scaling too),
an HF folder's dtype and SentencePiece-only tokenizer, and the CLI end to end."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.convert import hf_config, hf_layout
from internevo_jax.generate import (
    Generator,
    PromptError,
    Settings,
    apply_length_penalty,
    apply_repetition_penalty,
    checkpoint_config,
    load_model,
    next_tokens,
    top_k_top_p_filter,
)
from internevo_jax.model import build_model, dynamic_ntk_base, rope_tables

from . import test_tokenized
from .conftest import ROOT, random_hf_llama, random_tiny_model

sp_model = test_tokenized.sp_model  # a 100-piece SentencePiece model; ids 1 and 2 are BOS and EOS
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3], [40, 41, 42, 43, 44]]
FAMILIES = {
    "INTERNLM": ("model_type='INTERNLM'", "model.num_kv_attention_heads=4"),  # MHA with qkv/out biases
    "INTERNLM2": (),  # GQA, 4 query heads on 2 kv heads
    "LLAMA2": ("model_type='LLAMA2'",),  # GQA with the Meta-interleaved q/k layout
}


def gen_config(tiny_config, *overrides, **generation):
    settings = dict(do_sample=False, max_length=20, batch_size=3, eos_id=[]) | generation
    return tiny_config(*overrides, *(f"generation.{k}={v!r}" for k, v in settings.items()))


def random_model(cfg, seed=3):
    """A tiny model with random biases and norm weights and larger logits, so no argmax is a near tie."""
    model, params = random_tiny_model(cfg, seed)
    params["output"] = 5 * params["output"]
    nnx.update(model, params)
    return model


def reference_greedy(model, prompts, max_length, eos=()):
    """Argmax of a full forward (no cache) per new token, every row in one fixed [N, max_length] buffer: attention
    is causal, so what lies past a row's current end never reaches the logits read at its end."""
    graphdef, state = nnx.split(model)
    n = len(prompts)
    positions, segments = jnp.tile(jnp.arange(max_length), (n, 1)), jnp.ones((n, max_length), jnp.int32)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, positions, segments))
    buf = np.zeros((n, max_length), np.int32)
    ends = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    out, done = [[] for _ in prompts], np.zeros(n, bool)
    while not done.all():
        lg = np.asarray(forward(state, buf))
        for i in np.flatnonzero(~done):
            tok = int(np.argmax(lg[i, ends[i] - 1]))
            out[i].append(tok)
            buf[i, ends[i]] = tok
            ends[i] += 1
            done[i] = tok in eos or ends[i] == max_length
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_with_cache_equals_full_forward_argmax(tiny_config, family):
    cfg = gen_config(tiny_config, *FAMILIES[family])
    model = random_model(cfg)
    prompts = PROMPTS[:3]  # three lengths in one batch: each row must equal its own reference
    outputs = Generator(model, cfg.generation).generate(prompts)
    want = reference_greedy(model, prompts, 20)
    assert [o.tokens for o in outputs] == want
    assert [len(o.tokens) for o in outputs] == [20 - len(p) for p in prompts]  # max_length counts each own prompt
    assert {o.finish_reason for o in outputs} == {"length"}


def test_batch_invariance_while_sampling_with_dynamic_ntk(tiny_config):
    """Every sampling knob on, and dynamic NTK with rows crossing max_position_embeddings at different steps: a
    prompt's tokens are the same alone and among neighbours of other lengths (its key is its index, not its slot)."""
    overrides = ("model.use_dynamic_ntk_rope=True", "model.max_position_embeddings=12")
    knobs = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.7, repetition_penalty=1.3, length_penalty=1.2)
    cfg = gen_config(tiny_config, *overrides, batch_size=3, max_length=24, **knobs)
    model = random_model(cfg)
    batched = Generator(model, cfg.generation, seed=7)
    together = [o.tokens for o in batched.generate(PROMPTS)]  # batches [0, 1, 2] and [3 + two filler rows]
    single = Generator(model, gen_config(tiny_config, *overrides, batch_size=1, max_length=24, **knobs).generation, 7)
    alone = [single.generate([p], first_index=i)[0].tokens for i, p in enumerate(PROMPTS)]
    assert together == alone
    assert [o.tokens for o in batched.generate(PROMPTS)] == together  # deterministic
    batched.key = jax.random.key(8)
    assert [o.tokens for o in batched.generate(PROMPTS)] != together  # ... and the seed matters


def test_rows_stop_at_their_eos(tiny_config):
    cfg = gen_config(tiny_config)
    model = random_model(cfg)
    free = reference_greedy(model, PROMPTS[:3], 20)
    eos, extra = [free[0][2], 250], free[1][4]  # eos_id as a list, plus additional_eos_token_list
    cfg = gen_config(tiny_config, eos_id=eos, additional_eos_token_list=[extra])
    outputs = Generator(model, cfg.generation).generate(PROMPTS[:3])
    want = reference_greedy(model, PROMPTS[:3], 20, eos=(*eos, extra))
    assert [o.tokens for o in outputs] == want
    for o, prompt in zip(outputs, PROMPTS, strict=False):
        stops = [i for i, t in enumerate(o.tokens) if t in (*eos, extra)]
        if o.finish_reason == "eos":  # the EOS is the last token reported; nothing after it
            assert stops == [len(o.tokens) - 1] and len(o.tokens) < 20 - len(prompt)
        else:
            assert not stops and len(o.tokens) == 20 - len(prompt)
    assert outputs[0].finish_reason == outputs[1].finish_reason == "eos"


def internevo_filter(logits, top_k, top_p, min_keep):
    """InternEvo's top_k_top_p_filtering (torch code) transliterated to numpy, the oracle for ours."""
    logits = logits.copy()
    if top_k > 0:
        k = min(max(top_k, min_keep), logits.shape[-1])
        kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1 : k]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
        cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
        remove = cumulative > top_p
        if min_keep > 1:
            remove[:, :min_keep] = False
        remove[:, 1:] = remove[:, :-1].copy()
        remove[:, 0] = False
        back = np.zeros_like(remove)
        np.put_along_axis(back, order, remove, -1)
        logits[back] = -np.inf
    return logits


def test_top_k_top_p_filters_on_hand_made_logits():
    inf = -np.inf
    ties = jnp.array([[5.0, 4.0, 4.0, 3.0, 1.0, 0.0]])
    np.testing.assert_array_equal(top_k_top_p_filter(ties, 2, 1.0), [[5, 4, 4, inf, inf, inf]])  # ties kept
    np.testing.assert_array_equal(top_k_top_p_filter(ties, 1, 1.0), [[5, 4, 4, inf, inf, inf]])  # k >= min_keep 2
    np.testing.assert_array_equal(top_k_top_p_filter(ties, 1, 1.0, 1), [[5, inf, inf, inf, inf, inf]])
    np.testing.assert_array_equal(top_k_top_p_filter(ties, 50, 1.0), ties)  # k > V: nothing removed

    # Probabilities 0.5, 0.3, 0.1, 0.06, 0.04 in shuffled vocab order; cumulative 0.5, 0.8, 0.9, 0.96, 1.0.
    order = [3, 0, 4, 1, 2]
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))[:, jnp.argsort(jnp.array(order))]

    def kept(top_p, min_keep):
        out = np.asarray(top_k_top_p_filter(logits, 0, top_p, min_keep))[0]
        return sorted(order.index(i) for i in np.flatnonzero(np.isfinite(out)))  # ranks that survive

    assert kept(0.6, 1) == [0, 1]  # the first token past top_p is kept
    assert kept(0.6, 2) == [0, 1, 2]  # InternEvo unmarks the first min_keep, then shifts: min_keep + 1 survive
    assert kept(0.85, 2) == [0, 1, 2]
    assert kept(0.3, 2) == [0, 1, 2]
    assert kept(0.95, 1) == [0, 1, 2, 3]

    rng = np.random.default_rng(0)
    many = rng.normal(size=(16, 50)).astype(np.float32) * 3
    for top_k, top_p in [(0, 0.5), (10, 1.0), (10, 0.7), (3, 0.99), (1, 0.1)]:
        got = np.asarray(top_k_top_p_filter(jnp.asarray(many), top_k, top_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(internevo_filter(many, top_k, top_p, 2)))


def test_penalties_and_temperature():
    logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_array_equal(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0, -1.0]])  # CTRL
    np.testing.assert_allclose(
        apply_length_penalty(logits, jnp.array([4]), 0.5, eos=[1]), [[1.0, -2.0, 0.5, -0.5]]
    )  # / 4 ** 0.5, EOS column untouched

    base = dict(max_length=8, do_sample=True, top_k=0, top_p=1.0, repetition_penalty=1.0, length_penalty=1.0)
    n = 20000
    rows = jnp.tile(jnp.array([[0.0, 1.0, 2.0]]), (n, 1))
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(lambda s, lg: next_tokens(lg, None, jnp.ones(n, jnp.int32), keys, s), static_argnums=0)
    s = Settings(temperature=0.5, eos_ids=(), pad_id=1, **base)
    freq = np.bincount(np.asarray(draw(s, rows)), minlength=3) / n
    np.testing.assert_allclose(freq, jax.nn.softmax(jnp.array([0.0, 2.0, 4.0])), atol=0.01)  # softmax(l / T)
    # top_k=1 keeps min_tokens_to_keep=2 tokens: both are drawn, the third never.
    s = Settings(**(base | dict(top_k=1)), temperature=1.0, eos_ids=(), pad_id=1)
    freq = np.bincount(np.asarray(draw(s, rows)), minlength=3) / n
    assert freq[0] == 0 and freq[1] > 0.2 and freq[2] > 0.6
    greedy = Settings(**(base | dict(do_sample=False)), temperature=0.5, eos_ids=(), pad_id=1)
    assert set(np.asarray(draw(greedy, rows)).tolist()) == {2}


def test_dynamic_ntk_base_is_per_row_and_follows_the_formula(tiny_config):
    cfg = tiny_config(
        "model.use_dynamic_ntk_rope=True", "model.max_position_embeddings=16", "model.rope_scaling_factor=2.0"
    )
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    # Row 0 is 10 tokens long (padding at position 0), row 1 at its 40th token (a decode step writes position 39).
    positions = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0], [39] * 12])
    want = np.array([[10000.0], [10000.0 * (2.0 * 40 / 16 - 1.0) ** (16 / 14)]])
    np.testing.assert_allclose(dynamic_ntk_base(positions, 10000.0, 16, 16, 2.0), want, rtol=1e-6)
    cos, sin = model.rope(positions)
    want_cos, want_sin = rope_tables(positions, 16, jnp.asarray(want, jnp.float32), jnp.float32)
    np.testing.assert_allclose(cos, want_cos, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sin, want_sin, rtol=1e-6, atol=1e-6)
    # Row 0's tables are those of plain RoPE: the long neighbour does not change its base.
    np.testing.assert_allclose(cos[0], rope_tables(positions[:1], 16, 10000.0, jnp.float32)[0][0], atol=1e-6)


def test_generation_config_is_checked(tiny_config):
    with pytest.raises(config_lib.ConfigError, match=r"generation.num_beams=4: beam search is not implemented"):
        tiny_config("generation.num_beams=4")
    with pytest.raises(config_lib.ConfigError, match=r"generation.temperature must be > 0.*do_sample=False"):
        tiny_config("generation.temperature=0")
    with pytest.raises(config_lib.ConfigError, match=r"generation.top_p must be in \(0, 1\]"):
        tiny_config("generation.top_p=1.5")
    with pytest.raises(config_lib.ConfigError, match=r"generation.eos_id must be a token id or a list"):
        tiny_config("generation.eos_id=[2, 'x']")
    cfg = gen_config(tiny_config, max_length=8)
    gen = Generator(build_model(cfg.model_type, cfg.model, nnx.Rngs(0)), cfg.generation)
    with pytest.raises(PromptError, match=r"prompt 1 has 8 tokens but generation.max_length=8 counts the prompt"):
        gen.generate([[1], list(range(8))])
    with pytest.raises(PromptError, match=r"prompt 0 has token ids outside the vocabulary \[0, 256\): \[300\]"):
        gen.generate([[1, 300]])


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face parity (CPU torch, Python 3.11 CI)


def _hf_generate(folder, prompts, max_length, eos):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = []
    for p in prompts:  # a fresh model per prompt: the dynamic rope keeps its base across generate calls
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            ids = hf.generate(
                torch.tensor([p]), max_length=max_length, do_sample=False, eos_token_id=eos, pad_token_id=0
            )
        out.append(ids[0, len(p) :].tolist())
    return out


def _ours_from_folder(tiny_config, folder, max_length, eos):
    model_type, values = hf_config.model_overrides(json.loads((folder / "config.json").read_text()))
    overrides = [f"model_type={model_type!r}", *(f"model.{k}={v!r}" for k, v in values.items())]
    cfg = gen_config(tiny_config, *overrides, max_length=max_length, eos_id=eos, batch_size=2)
    outputs = Generator(load_model(cfg, str(folder)), cfg.generation).generate(PROMPTS[:2])
    return [o.tokens for o in outputs]


LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8
)


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3], ids=["plain", "llama3"])
def test_greedy_matches_transformers_generate_on_an_hf_folder(tiny_config, tmp_path, rope_scaling):
    pytest.importorskip("transformers")
    # logits far apart: greedy paths do not hinge on rounding
    random_hf_llama(tmp_path / "hf", head_scale=20, rope_scaling=rope_scaling and dict(rope_scaling))
    want = _hf_generate(tmp_path / "hf", PROMPTS[:2], 28, eos=[2])
    assert _ours_from_folder(tiny_config, tmp_path / "hf", 28, [2]) == want


def _generate_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_an_hf_folder_runs_in_its_dtype_with_its_sentencepiece_tokenizer(tiny_config, tmp_path, sp_model):
    """Without --config an HF folder computes in its config.json's torch_dtype (dtype in transformers 5), else in
    its weights' dtype, not InternEvo's fp16 default; a folder whose tokenizer is only tokenizer.model is read
    with SentencePiece (BOS + pieces), not as a Hugging Face tokenizer folder."""
    cfg = tiny_config("model_type='LLAMA2'")
    params = nnx.to_pure_dict(nnx.state(random_model(cfg)))
    folder = hf_layout.save_hf(params, cfg.model, tmp_path / "hf", dtype="bfloat16")
    config = json.loads((folder / "config.json").read_text())
    for dtype_keys, want in [
        (dict(torch_dtype="bfloat16"), "torch.bfloat16"),
        (dict(torch_dtype=None, dtype="float32"), "torch.float32"),  # transformers 5's key
        (dict(torch_dtype="float16"), "torch.float16"),
        (dict(torch_dtype=None), "torch.bfloat16"),  # none given: the weights' dtype
    ]:
        (folder / "config.json").write_text(json.dumps(config | dtype_keys))
        assert checkpoint_config(str(folder)).model.dtype == want
    assert checkpoint_config(str(folder), ["--config.model.dtype='torch.float32'"]).model.dtype == "torch.float32"

    sp_path, _, sp = sp_model
    (folder / "tokenizer.model").write_bytes(sp_path.read_bytes())
    tool = _generate_tool()
    gen = checkpoint_config(f"local:{folder}")
    assert tool.tokenizer_path(gen) == str(folder)
    text = tool.TextTokenizer(tool.tokenizer_path(gen))
    assert text.encode("kalo mine") == [sp.bos_id(), *sp.encode("kalo mine")]
    assert text.decode(sp.encode("kalo mine")) == "kalo mine"


def test_dynamic_ntk_decoding_matches_transformers_past_max_positions(tiny_config, tmp_path):
    """Past max_position_embeddings every step rotates its query and key with the base for the current length while
    the cached keys keep theirs: what transformers' dynamic rope does with its cache."""
    pytest.importorskip("torch")
    ntk = ("model_type='LLAMA2'", "model.use_dynamic_ntk_rope=True", "model.max_position_embeddings=8")
    cfg = tiny_config(*ntk, "model.rope_scaling_factor=4.0", "model.layer_norm_epsilon=1e-6")
    model = random_model(cfg)
    params = nnx.to_pure_dict(nnx.state(model))
    params["layers"]["attention"]["wqkv"] = 6 * params["layers"]["attention"]["wqkv"]  # sharp, position-aware
    nnx.update(model, params)
    folder = hf_layout.save_hf(params, cfg.model, tmp_path / "hf")  # prompt 1 (11 tokens) is past 8 already
    want = _hf_generate(folder, PROMPTS[:2], 40, eos=[2])
    assert _ours_from_folder(tiny_config, folder, 40, [2]) == want
    # Not the same as recomputing every key with the newest base, which a full forward does.
    assert want != reference_greedy(model, PROMPTS[:2], 40)


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_on_an_orbax_checkpoint_and_an_hf_folder(tiny_config, tmp_path, sp_model):
    cfg = tiny_config("model.layer_norm_epsilon=1e-6")
    model = random_model(cfg)
    params = nnx.to_pure_dict(nnx.state(model))
    ckpt = config_lib.default_config().ckpt
    ckpt.update(dict(save_ckpt_folder=str(tmp_path / "run"), checkpoint_every=1))
    writer = Checkpointer(ckpt)  # params only, as tools/convert_checkpoint.py writes them
    writer.save(5, {"params": params}, dict(config=config_lib.to_json(cfg)))
    writer.close()
    hf = hf_layout.save_hf(params, cfg.model, tmp_path / "hf")

    prompts = [dict(tokens=p, id=i) for i, p in enumerate(PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts) + "\n")
    common = [
        "--config.generation.do_sample=False",
        "--config.generation.max_length=16",
        "--config.generation.eos_id=[]",
    ]
    tool = [sys.executable, str(ROOT / "tools" / "generate.py")]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    from_orbax = subprocess.Popen(
        [
            *tool,
            f"--config.generation.ckpt_folder=local:{tmp_path / 'run'}",  # no --config: the saved one
            f"--prompts={tmp_path / 'prompts.jsonl'}",
            f"--output={tmp_path / 'out' / 'gen.jsonl'}",
            "--config.generation.batch_size=3",
            *common,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    from_hf = subprocess.run(
        [
            *tool,
            f"--config.generation.ckpt_folder={hf}",
            f"--config.generation.tokenizer_path={sp_model[0]}",
            "--prompt",
            "kalo mine",
            *common,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    out, err = from_orbax.communicate(timeout=300)
    assert from_orbax.returncode == 0, err
    assert "tokens/s" in out and "compiling" in out
    lines = [json.loads(x) for x in (tmp_path / "out" / "gen.jsonl").read_text().splitlines()]
    want = reference_greedy(model, PROMPTS, 16)
    assert [x["prompt"] for x in lines] == prompts
    assert [x["tokens"] for x in lines] == want
    assert all(x["finish_reason"] == "length" and "text" not in x for x in lines)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gen.jsonl"]  # written atomically

    assert from_hf.returncode == 0, from_hf.stderr
    sp = sp_model[2]
    (line,) = [json.loads(x) for x in from_hf.stdout.splitlines() if x.startswith("{")]
    ids = [sp.bos_id(), *sp.encode("kalo mine")]
    assert line["prompt"] == {"text": "kalo mine"}
    assert line["tokens"] == reference_greedy(model, [ids], 16)[0]
    assert line["text"] == sp.decode([t for t in line["tokens"] if t < 100])  # ids past the tokenizer's: nothing

    bad = subprocess.run([*tool, f"--config.generation.ckpt_folder={hf}", "--prompt", "x"], capture_output=True)
    assert bad.returncode == 2 and b"needs a tokenizer" in bad.stderr
