"""internevo_jax/convert/torch_ckpt.py: InternEvo PyTorch step folders and Meta's consolidated Llama weights read back
bit-exact into our params, for every family and TP/PP/isp layout; errors name the file, the tensor and the fix.

The writers below build the PyTorch files from our params the way the reference says InternEvo and Meta store them
(M-01 names, M-04 fused layouts, HF-01/HF-02/P-07 split rules, M-15 pipeline partition), independently of the
reader, so a reader bug cannot hide behind a matching writer bug.
"""

import json
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from internevo_jax.checkpoint import plan
from internevo_jax.config import ConfigError
from internevo_jax.convert import hf_folder, meta_llama, torch_ckpt
from internevo_jax.errors import CheckpointError
from internevo_jax.model import build_model

from .conftest import ROOT

torch = pytest.importorskip("torch")

from tools import convert_checkpoint  # noqa: E402  (after the torch skip)

TINY = str(ROOT / "configs" / "tiny.py")


def random_params(cfg, seed=0):
    """Our params tree for ``cfg`` (from the model's abstract shapes) filled with random float32 numbers.

    Faster than initialising the model eagerly, and every leaf (norms, biases) is off its init value, so every
    mapping is exercised.
    """
    abstract = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg.model_type, cfg.model, nnx.Rngs(0)))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), abstract)


# ---------------------------------------------------------------------------------------------------------------------
# Writers (the inverse of the readers, from the reference text)


def whole_tensors(params, m, half_split=False):
    """Our params as whole PyTorch [out, in] matrices: per-layer dicts by role, and the top-level ones.

    q rows are head-major with head n = kv * G + g (the grouping of repeat_kv). ``half_split``: our params hold
    the Meta-interleaved q/k channels; store them reordered [even..., odd...] per head (M-05, adapt_hf=True).
    """
    a = jax.tree.map(np.asarray, params)
    n, k, d = m.num_attention_heads, m.num_kv_attention_heads, m.hidden_size
    g, hd = n // k, d // n
    order = np.r_[0:hd:2, 1:hd:2] if half_split else np.arange(hd)
    attn, ff = a["layers"]["attention"], a["layers"]["feed_forward"]
    layers = []
    for i in range(m.num_layers):
        w, out = attn["wqkv"][i], {}  # [D, K, G + 2, H]
        out["q"] = np.concatenate([w[:, h // g, h % g, order].T for h in range(n)])
        out["k"] = np.concatenate([w[:, j, g, order].T for j in range(k)])
        out["v"] = np.concatenate([w[:, j, g + 1, :].T for j in range(k)])
        if "bqkv" in attn:
            b = attn["bqkv"][i]
            out["bq"] = np.concatenate([b[h // g, h % g, order] for h in range(n)])
            out["bk"] = np.concatenate([b[j, g, order] for j in range(k)])
            out["bv"] = np.concatenate([b[j, g + 1] for j in range(k)])
            out["bo"] = attn["bo"][i]
        out["o"] = attn["wo"][i].reshape(n * hd, d).T
        out["gate"], out["up"], out["down"] = ff["w1"][i].T, ff["w3"][i].T, ff["w2"][i].T
        out["norm1"] = a["layers"]["attention_norm"]["weight"][i]
        out["norm2"] = a["layers"]["ffn_norm"]["weight"][i]
        layers.append(out)
    top = dict(embed=a["tok_embeddings"], head=a["output"].T, norm=a["norm"]["weight"])
    return layers, top


def chunk(x, parts, dim, t):
    """torch.chunk's piece ``t``, cloned so the file holds only that piece."""
    return torch.from_numpy(np.ascontiguousarray(x)).chunk(parts, dim)[t].clone()


def fused_qkv(layer, m, family, t, tp):
    """The fused qkv rows of TP shard ``t`` (M-04)."""
    n, k = m.num_attention_heads, m.num_kv_attention_heads
    g, hd = n // k, m.hidden_size // n
    out = {}
    for param, (q, kk, v) in (("weight", ("q", "k", "v")), ("bias", ("bq", "bk", "bv"))):
        if q not in layer:
            continue
        if family == "INTERNLM":  # each shard: [q; k; v] of its own heads, i.e. its own (three, h/tp, d)
            out[param] = torch.cat([chunk(layer[x], tp, 0, t) for x in (q, kk, v)])
        else:  # per kv group [q_0..q_{G-1}, k, v], then a contiguous split of dim 0
            groups = [
                np.concatenate([layer[q][j * g * hd : (j + 1) * g * hd], layer[kk][j * hd : (j + 1) * hd]])
                for j in range(k)
            ]
            groups = [np.concatenate([x, layer[v][j * hd : (j + 1) * hd]]) for j, x in enumerate(groups)]
            out[param] = chunk(np.concatenate(groups), tp, 0, t)
    return out


def stage_layers(num_layers, pp, chunks):
    """M-15: per (chunk, stage) the global layer ids; each chunk's layers split over the stages, L_c // pp each,
    and the last L_c % pp stages get one more."""
    per_chunk, out = num_layers // chunks, {}
    for c in range(chunks):
        start = c * per_chunk
        for p in range(pp):
            size = per_chunk // pp + (p >= pp - per_chunk % pp)
            out[(c, p)] = list(range(start, start + size))
            start += size
    return out


def internevo_state(layers, top, m, family, t, tp, ids, first, last, *, embed_hidden, w3_down, isp_w=None, wp=1):
    """One rank's state dict for one pipeline slice: M-01 names, local layer indices, TP (or isp) shards."""
    sd = {}
    internlm1 = family == "INTERNLM"
    # Under isp (P-07) the block linears are split on dim 0 over wp; otherwise the TP rules of HF-01/HF-02.
    lin, lt, ln = (0, isp_w, wp) if isp_w is not None else (None, t, tp)
    for local, i in enumerate(ids):
        L = layers[i]
        pre = f"blocks.{local}." if internlm1 else f"layers.{local}."
        if isp_w is not None and internlm1:  # one [q; k; v] of all heads, split on rows
            qkv = {
                p: chunk(np.concatenate([L[a], L[b], L[c]]), wp, 0, isp_w)
                for p, (a, b, c) in (("weight", ("q", "k", "v")), ("bias", ("bq", "bk", "bv")))
                if a in L
            }
        elif family == "LLAMA2":
            qkv = None
        else:
            qkv = fused_qkv(L, m, family, lt, ln)
        if qkv is not None:
            for p, x in qkv.items():
                sd[pre + ("mixer.Wqkv." if internlm1 else "attention.wqkv.") + p] = x
        else:
            for name, key in (("wq", "q"), ("wk", "k"), ("wv", "v")):
                sd[pre + f"attention.{name}.weight"] = chunk(L[key], ln, 0, lt)
        o = "mixer.out_proj." if internlm1 else "attention.wo."
        sd[pre + o + "weight"] = chunk(L["o"], ln, lin if lin is not None else 1, lt)
        if "bo" in L and (isp_w is not None or t == 0):  # row-parallel bias: TP rank 0 only (M-02)
            sd[pre + o + "bias"] = chunk(L["bo"], ln, 0, lt) if isp_w is not None else torch.from_numpy(L["bo"].copy())
        mlp = "mlp." if internlm1 else "feed_forward."
        down_name, up_name = ("w3", "w2") if w3_down else ("w2", "w3")  # HF-01's legacy naming: w3 = down
        sd[pre + mlp + "w1.weight"] = chunk(L["gate"], ln, 0, lt)
        sd[pre + mlp + up_name + ".weight"] = chunk(L["up"], ln, 0, lt)
        sd[pre + mlp + down_name + ".weight"] = chunk(L["down"], ln, lin if lin is not None else 1, lt)
        n1, n2 = ("norm1", "norm2") if internlm1 else ("attention_norm", "ffn_norm")
        sd[pre + n1 + ".weight"] = torch.from_numpy(L["norm1"].copy())
        sd[pre + n2 + ".weight"] = torch.from_numpy(L["norm2"].copy())
        attn = "mixer." if internlm1 else "attention."
        sd[pre + attn + "rotary_emb.inv_freq"] = torch.ones(8)  # a buffer InternEvo saves too; skipped on read
    if first:
        base = "embedding" if internlm1 else "tok_embeddings"
        if embed_hidden:
            sd[base + ".weight"] = chunk(top["embed"], tp, 1, t)
        else:  # flash-attn's vocab-parallel embedding
            sd[base + ".word_embeddings.weight"] = chunk(top["embed"], tp, 0, t)
    if last:
        sd["norm.weight"] = torch.from_numpy(top["norm"].copy())
        sd[("head" if internlm1 else "output") + ".weight"] = chunk(top["head"], tp, 0, t)
    return sd


def write_internevo(
    folder,
    params,
    cfg,
    tp=1,
    pp=1,
    chunks=1,
    wp=0,
    dtype=None,
    prefix="",
    embed_hidden=True,
    w3_down=False,
    half_split=False,
    saved_model=None,
    step=5,
):
    """An InternEvo step folder ``folder/{step}/`` (CK-01) with its ``{step}.step`` marker; returns the step folder."""
    m, family = cfg.model, cfg.model_type
    family = "INTERNLM" if family == "INTERNLM_MoE" else family  # InternLM1's names (M-01); the MoE MLP is added after
    layers, top = whole_tensors(params, m, half_split)
    slices = stage_layers(m.num_layers, pp, chunks)
    out = folder / str(step)
    out.mkdir(parents=True)
    # isp: world = wp ranks, contiguous ranks form the tp (sequence) groups, so rank r has t = r % tp, w = r.
    ranks = [(r % tp, r) for r in range(wp)] if wp else [(t, None) for t in range(tp)]
    for p in range(pp):
        for t, w in ranks:
            sd = {}
            for c in range(chunks):
                part = internevo_state(
                    layers,
                    top,
                    m,
                    family,
                    t,
                    tp,
                    slices[(c, p)],
                    (c, p) == (0, 0),
                    (c, p) == (chunks - 1, pp - 1),
                    embed_hidden=embed_hidden,
                    w3_down=w3_down,
                    isp_w=w,
                    wp=max(wp, 1),
                )
                sd |= {(f"{c}." if chunks > 1 else "") + prefix + k: v for k, v in part.items()}
            if dtype is not None:
                sd = {k: v.to(dtype) for k, v in sd.items()}
            name = f"model_tp{t}_wp{w}_pp{p}.pt" if wp else f"model_tp{t}_pp{p}.pt"
            torch.save(sd, out / name)
    saved = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        vocab_size=m.vocab_size,
        mlp_ratio=m.mlp_ratio,
        num_attention_heads=m.num_attention_heads,
        dtype=torch.bfloat16,
        rope_base=m.rope_base,
    )
    if family != "INTERNLM":
        saved |= dict(num_kv_attention_heads=m.num_kv_attention_heads, adapt_hf=half_split or not m.qk_interleaved)
    torch.save(saved | (saved_model or {}), out / "model_config.pt")
    torch.save({"step": step}, out / f"{step}.step")
    (out / "topo_tp0_pp0.json").write_text("{}")  # what InternEvo v0.5 writes
    return out


def write_meta(folder, params, cfg, shards=1, vocab_size=-1, **params_json):
    """Meta's ``consolidated.{NN}.pth`` model-parallel shards + ``params.json`` (interleaved q/k as stored)."""
    m = cfg.model
    layers, top = whole_tensors(params, m)
    folder.mkdir(parents=True)
    for s in range(shards):
        sd = {"tok_embeddings.weight": chunk(top["embed"], shards, 1, s), "rope.freqs": torch.ones(8)}
        for i, L in enumerate(layers):
            pre = f"layers.{i}."
            for name, key, dim in (
                ("attention.wq", "q", 0),
                ("attention.wk", "k", 0),
                ("attention.wv", "v", 0),
                ("attention.wo", "o", 1),
                ("feed_forward.w1", "gate", 0),
                ("feed_forward.w2", "down", 1),
                ("feed_forward.w3", "up", 0),
            ):
                sd[pre + name + ".weight"] = chunk(L[key], shards, dim, s)
            sd[pre + "attention_norm.weight"] = torch.from_numpy(L["norm1"].copy())
            sd[pre + "ffn_norm.weight"] = torch.from_numpy(L["norm2"].copy())
        sd["norm.weight"] = torch.from_numpy(top["norm"].copy())
        sd["output.weight"] = chunk(top["head"], shards, 0, s)
        torch.save(sd, folder / f"consolidated.{s:02d}.pth")
    info = dict(
        dim=m.hidden_size,
        n_layers=m.num_layers,
        n_heads=m.num_attention_heads,
        n_kv_heads=m.num_kv_attention_heads,
        vocab_size=vocab_size,
        multiple_of=256,
        norm_eps=m.layer_norm_epsilon,
    )
    (folder / "params.json").write_text(json.dumps(info | params_json))
    return folder


def assert_same(got, want, dtype=None):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w) if dtype is None else np.asarray(w).astype(dtype)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def tiny(tiny_config, family, *extra):
    heads = ["model.num_kv_attention_heads=4"] if family == "INTERNLM" else []
    return tiny_config(f"model_type='{family}'", *heads, *extra)


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


CASES = {
    "internlm1-tp1": ("INTERNLM", 2, dict()),
    # InternLM1 with the vocab-split embedding (embed_split_hidden=False) and HF-01's legacy w3 = down naming
    "internlm1-tp2-pp2": ("INTERNLM", 3, dict(tp=2, pp=2, embed_hidden=False, w3_down=True)),
    "internlm2-tp1": ("INTERNLM2_PUBLIC", 2, dict()),
    # bf16 as InternEvo saves a bf16 model, and a leftover ``model.`` prefix
    "internlm2-tp2-pp2-bf16": ("INTERNLM2_PUBLIC", 4, dict(tp=2, pp=2, dtype="bfloat16", prefix="model.")),
    "llama2-tp1": ("LLAMA2", 2, dict()),
    "llama2-tp2-pp2": ("LLAMA2", 3, dict(tp=2, pp=2)),
    # interleaved pipeline chunks, and a checkpoint trained with adapt_hf=True (half-split q/k) read into our
    # LLAMA2 default (Meta-interleaved): the reader permutes the channels back
    "llama2-chunks-halfsplit": ("LLAMA2", 4, dict(tp=2, pp=2, chunks=2, half_split=True)),
    "internlm2-isp": ("INTERNLM2_PUBLIC", 2, dict(tp=2, wp=4)),
    "internlm1-isp": ("INTERNLM", 2, dict(tp=2, wp=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_internevo_folder_reads_back_bit_exact(case, tiny_config, tmp_path):
    family, num_layers, kw = CASES[case]
    cfg = tiny(tiny_config, family, f"model.num_layers={num_layers}")
    params = random_params(cfg)
    dtype = kw.pop("dtype", None)
    step = write_internevo(tmp_path, params, cfg, dtype=getattr(torch, dtype) if dtype else None, **kw)
    got = torch_ckpt.load_internevo(step, cfg.model)
    assert_same(got, params, ml_dtypes.bfloat16 if dtype else None)
    assert torch_ckpt.find_step(tmp_path) == step and torch_ckpt.is_internevo_folder(tmp_path)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_llama_reads_back_bit_exact(shards, tiny_config, tmp_path):
    cfg = tiny_config("model_type='LLAMA2'")
    params = random_params(cfg)
    folder = write_meta(tmp_path / "meta", params, cfg, shards)
    assert meta_llama.is_llama_folder(folder)
    assert_same(meta_llama.load_llama(folder, cfg.model), params)


def test_meta_use_scaled_rope_is_the_llama3_scaling(tiny_config, tmp_path):
    """Llama 3.1's params.json says ``use_scaled_rope: true`` and nothing more: Meta's code scales with factor 8, low 1,
    high 4 over 8192 original positions. A config without that scaling is told which keys to set; with it the
    weights load."""
    llama3 = (
        "model.rope_scaling_type='llama3'",
        "model.rope_scaling_factor=8.0",
        "model.rope_low_freq_factor=1.0",
        "model.rope_high_freq_factor=4.0",
        "model.rope_original_max_position_embeddings=8192",
    )
    cfg = tiny_config("model_type='LLAMA2'", *llama3)
    params = random_params(cfg)
    folder = write_meta(tmp_path / "meta", params, cfg, use_scaled_rope=True)
    assert_same(meta_llama.load_llama(folder, cfg.model), params)
    plain = tiny_config("model_type='LLAMA2'")
    with pytest.raises(ConfigError, match=r"model.rope_scaling_type=None but .*params.json has 'llama3'"):
        meta_llama.check_llama(folder, plain.model)
    with pytest.raises(ConfigError, match=r"model.rope_original_max_position_embeddings=\d+ but .* has 8192"):
        meta_llama.check_llama(folder, tiny_config(*llama3[:-1], "model_type='LLAMA2'").model)


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_file_the_tensor_and_the_fix(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config()
    params = random_params(cfg)
    step = write_internevo(tmp_path / "ie", params, cfg, tp=2, pp=2)

    # A wrong shape: the file, the tensor, both shapes and the keys to fix.
    bad = torch.load(step / "model_tp1_pp0.pt")
    bad["layers.0.attention.wo.weight"] = torch.zeros(64, 16)
    torch.save(bad, step / "model_tp1_pp0.pt")
    with pytest.raises(ConfigError) as e:
        torch_ckpt.load_internevo(step, cfg.model)
    assert (
        f"{step}/model_tp1_pp0.pt: tensor 'layers.0.attention.wo.weight' has shape (64, 16), the config expects "
        "(64, 32) (one of 2 shards of (64, 64)); fix model.hidden_size / model.num_attention_heads" in str(e.value)
    )

    # A missing shard file.
    (step / "model_tp1_pp1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"shard files missing: \['model_tp1_pp1.pt'\].*tp=2, pp=2"):
        torch_ckpt.load_internevo(step, cfg.model)

    # model_config.pt disagreeing with the config, and a layer count that does not fit.
    step2 = write_internevo(tmp_path / "ie2", params, cfg, saved_model=dict(rope_base=1e6))
    with pytest.raises(
        ConfigError,
        match=r"model.rope_base=10000 but .*model_config.pt has 1000000.0\nfix: --config.model.rope_base=1000000.0",
    ):
        torch_ckpt.check_internevo(step2, cfg.model)
    with pytest.raises(ConfigError, match="holds 2 layers .* model.num_layers=3; set --config.model.num_layers=2"):
        step3 = write_internevo(tmp_path / "ie3", params, cfg, saved_model=dict(num_layers=None))
        torch_ckpt.load_internevo(step3, tiny_config("model.num_layers=3").model)

    # Biases the config has no place for.
    cfg1 = tiny(tiny_config, "INTERNLM")
    params1 = random_params(cfg1)
    step1 = write_internevo(tmp_path / "ie4", params1, cfg1)
    with pytest.raises(ConfigError, match=r"'blocks.0.mixer.Wqkv.bias' has no place in the config \(model.no_bias"):
        torch_ckpt.load_internevo(step1, tiny(tiny_config, "INTERNLM", "model.no_bias=True").model)

    # Meta: params.json disagreeing with the config.
    llama = tiny_config("model_type='LLAMA2'")
    meta = write_meta(tmp_path / "meta", random_params(llama), llama, n_layers=3)
    with pytest.raises(ConfigError, match=r"the config and Meta's params.json disagree:\n  model.num_layers=2 but"):
        meta_llama.load_llama(meta, llama.model)

    # No torch: the message says what to install.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="reading InternEvo .pt checkpoints needs torch: pip install torch"):
        torch_ckpt.load_internevo(step2, cfg.model)


# ---------------------------------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py and ckpt.load_ckpt_info


@pytest.mark.parametrize("source", ["internevo", "llama"])
def test_converter_writes_ours_and_hf_from_pytorch_sources(source, tiny_config, tmp_path, capsys):
    family = "INTERNLM2_PUBLIC" if source == "internevo" else "LLAMA2"
    cfg = tiny_config(f"model_type='{family}'")
    params = random_params(cfg)
    src = tmp_path / "src"
    if source == "internevo":
        read = write_internevo(src, params, cfg, tp=2, pp=2)  # a save folder: its newest step is taken
    else:
        read = write_meta(src, params, cfg, shards=2)
    args = [f"--config={TINY}", f"--config.model_type='{family}'"]

    # -> ours: detected source, our format by default, one step-0 folder of weights
    assert convert_checkpoint.main(["--src", str(src), "--dst", str(tmp_path / "ours"), *args]) == 0
    assert f"wrote {tmp_path / 'ours'} (internevo_jax) from {read}" in capsys.readouterr().out
    assert_same(convert_checkpoint.read_params(tmp_path / "ours" / "0", cfg), params)

    # -> HF
    assert convert_checkpoint.main(["--src", str(src), "--dst", str(tmp_path / "hf"), "--dst_format", "hf", *args]) == 0
    assert_same(hf_folder.load_hf(tmp_path / "hf", cfg.model), params)

    # The model shape must come from --config.
    assert convert_checkpoint.main(["--src", str(src), "--dst", str(tmp_path / "x")]) == 2
    assert f"--config=FILE is needed to read {source} weights" in capsys.readouterr().err


def test_load_ckpt_info_plans_pytorch_sources(tiny_config, tmp_path):
    def plan_for(cfg_overrides, path, kind, content="('model',)"):
        info = f"dict(path='local:{path}', content={content}, ckpt_type='{kind}')"
        return plan.plan_load(tiny_config(*cfg_overrides, f"ckpt.load_ckpt_info={info}"), {}, "why")

    cfg = tiny_config()
    write_internevo(tmp_path / "ie", random_params(cfg), cfg)
    assert plan_for([], tmp_path / "ie", "internevo") == plan.StartPlan("internevo_pt", "why", tmp_path / "ie" / "5")
    with pytest.raises(ConfigError, match=r"only the model weights can be read .*do not carry over; set content="):
        plan_for([], tmp_path / "ie", "internevo", "('model', 'optimizer')")
    with pytest.raises(ConfigError, match="model.num_layers=3 but .*model_config.pt has 2"):
        plan_for(["model.num_layers=3"], tmp_path / "ie", "internevo")  # checked before compiling

    llama = ["model_type='LLAMA2'"]
    meta = write_meta(tmp_path / "meta", random_params(tiny_config(*llama)), tiny_config(*llama))
    assert plan_for(llama, meta, "llama") == plan.StartPlan("llama", "why", meta)
    with pytest.raises(ConfigError, match=r"ckpt_type='llama' holds model weights only: set content=\('model',\)"):
        plan_for(llama, meta, "llama", "('model', 'optimizer')")


def test_trainer_starts_from_pytorch_checkpoints(tiny_config, tmp_path, logs):
    """load_ckpt_info with an InternEvo PyTorch step folder or Meta's consolidated weights: the run's first params
    are the checkpoint's weights (fp32 masters), placed on the mesh, and one log line says what was loaded."""
    from internevo_jax import Trainer

    cases = {
        "internevo": ((), lambda folder, params, cfg: write_internevo(folder, params, cfg, tp=2, pp=2)),
        "llama": (("model_type='LLAMA2'",), lambda folder, params, cfg: write_meta(folder, params, cfg, shards=2)),
    }
    for kind, (extra, write) in cases.items():
        cfg = tiny_config(*extra)
        params = random_params(cfg)
        folder = write(tmp_path / kind, params, cfg)
        info = f"dict(path='local:{folder}', content=('model',), ckpt_type='{kind}')"
        trainer = Trainer(
            tiny_config(*extra, f"ckpt.load_ckpt_info={info}", "parallel.tensor.size=2", f"run_folder='{tmp_path}/r'")
        )
        state, meta = trainer.initial_state()
        assert meta["batch_count"] == 0 and int(state.opt_state.count) == 0
        assert_same(jax.device_get(state.params), params)
    messages = [r.getMessage() for r in logs]
    assert any("loaded the model weights of the InternEvo PyTorch checkpoint" in m for m in messages)
    assert any("loaded the model weights of the Meta consolidated checkpoint" in m for m in messages)


# ---------------------------------------------------------------------------------------------------------------------
# INTERNLM_MoE: rank files + one file per (global layer, expert, TP rank) (CK-01, M-01, M-17)


def write_internevo_moe(folder, params, cfg, tp=1, pp=1, prefix="", expert_tp=True):
    """An INTERNLM_MoE step folder: the rank files of InternLM1 with the MLP replaced by the router (``gate.wg``,
    replicated) and, for residual MoE, ``residual_mlp`` (TP split as an MLP) and ``coefficient`` (replicated); the
    experts' w1/w2/w3 (TP split as an MLP) in ``model_moe_layer{L}_expert{E}_tp{t}.pt``, named with the stage-local
    layer and the global expert id as InternEvo's try_save_moe_checkpoint writes them. ``expert_tp=False``: every TP
    rank's expert file holds the whole expert (experts not tensor-parallel)."""
    m = cfg.model
    ff = jax.tree.map(np.asarray, params["layers"]["feed_forward"])
    out = write_internevo(folder, params, cfg, tp=tp, pp=pp, prefix=prefix)
    slices = stage_layers(m.num_layers, pp, 1)
    for p in range(pp):
        for t in range(tp):
            path = out / f"model_tp{t}_pp{p}.pt"
            sd = {k: v for k, v in torch.load(path).items() if ".mlp." not in k}  # the dense writer's MLP keys
            for local, i in enumerate(slices[(0, p)]):
                pre = f"{prefix}blocks.{local}.mlp."
                sd[pre + "moe_layer.gate.wg.weight"] = torch.from_numpy(ff["wg"][i].T.copy())
                if m.moe_use_residual:
                    sd[pre + "residual_mlp.w1.weight"] = chunk(ff["res_w1"][i].T, tp, 0, t)
                    sd[pre + "residual_mlp.w3.weight"] = chunk(ff["res_w3"][i].T, tp, 0, t)
                    sd[pre + "residual_mlp.w2.weight"] = chunk(ff["res_w2"][i].T, tp, 1, t)
                    sd[pre + "coefficient.weight"] = torch.from_numpy(ff["coefficient"][i].T.copy())
                    sd[pre + "coefficient.bias"] = torch.from_numpy(ff["coefficient_bias"][i].copy())
                for e in range(m.num_experts):
                    ex = f"{pre}moe_layer.experts.wrapped_experts.{e}."
                    et, etp = (t, tp) if expert_tp else (0, 1)
                    expert = {
                        ex + "w1.weight": chunk(ff["w1"][i, e].T, etp, 0, et),
                        ex + "w3.weight": chunk(ff["w3"][i, e].T, etp, 0, et),
                        ex + "w2.weight": chunk(ff["w2"][i, e].T, etp, 1, et),
                    }
                    torch.save(expert, out / f"model_moe_layer{i}_expert{e}_tp{t}.pt")
            torch.save(sd, path)
    return out


MOE_CASES = {
    "moe-tp1": (dict(), ()),
    "moe-tp2-pp2": (dict(tp=2, pp=2), ()),
    "moe-residual-tp2": (dict(tp=2, prefix="model."), ("model.moe_use_residual=True",)),
    "moe-tp2-whole-experts": (dict(tp=2, expert_tp=False), ()),
}


def moe_config(tiny_config, *extra):
    moe = ("model.num_experts=4", "model.num_kv_attention_heads=4", "model.num_layers=2")
    return tiny_config("model_type='INTERNLM_MoE'", *moe, *extra)


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_internevo_moe_folder_reads_back_bit_exact(case, tiny_config, tmp_path):
    kw, extra = MOE_CASES[case]
    cfg = moe_config(tiny_config, *extra)
    params = random_params(cfg)
    step = write_internevo_moe(tmp_path, params, cfg, **kw)
    assert_same(torch_ckpt.load_internevo(step, cfg.model), params)


def test_internevo_moe_via_converter_and_load_ckpt_info(tiny_config, tmp_path, capsys):
    cfg = moe_config(tiny_config)
    params = random_params(cfg)
    step = write_internevo_moe(tmp_path / "src", params, cfg, tp=2)
    args = [f"--config={TINY}", "--config.model_type='INTERNLM_MoE'", "--config.model.num_experts=4"]
    args += ["--config.model.num_kv_attention_heads=4", "--config.model.num_layers=2"]
    assert convert_checkpoint.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "ours"), *args]) == 0
    assert f"wrote {tmp_path / 'ours'} (internevo_jax) from {step}" in capsys.readouterr().out
    assert_same(convert_checkpoint.read_params(tmp_path / "ours" / "0", cfg), params)

    moe = ("model_type='INTERNLM_MoE'", "model.num_experts=4", "model.num_kv_attention_heads=4", "model.num_layers=2")
    info = f"dict(path='local:{tmp_path / 'src'}', content=('model',), ckpt_type='internevo')"
    planned = plan.plan_load(tiny_config(*moe, f"ckpt.load_ckpt_info={info}"), {}, "why")
    assert planned == plan.StartPlan("internevo_pt", "why", step)


def test_internevo_moe_errors_name_the_expert_file(tiny_config, tmp_path):
    cfg = moe_config(tiny_config)
    step = write_internevo_moe(tmp_path, random_params(cfg), cfg, tp=2)
    # A dense config on MoE files, and an MoE config with a different expert count: told before any tensor is read.
    with pytest.raises(ConfigError, match=r"MoE expert files .* but the config is a dense model; set model_type="):
        torch_ckpt.check_internevo(step, tiny(tiny_config, "INTERNLM", "model.num_layers=2").model)
    with pytest.raises(ConfigError, match=r"model_moe_layer0_expert2_tp0.pt lies outside .*model.num_experts=2"):
        torch_ckpt.check_internevo(step, moe_config(tiny_config, "model.num_experts=2").model)
    (step / "model_moe_layer1_expert3_tp1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"expert files missing: model_moe_layer1_expert3_tp1.pt \(layer 1, "):
        torch_ckpt.load_internevo(step, cfg.model)


def test_trainer_starts_from_an_internevo_moe_checkpoint(tiny_config, tmp_path, logs):
    """load_ckpt_info with an INTERNLM_MoE step folder: the run's first params are its weights, experts included."""
    from internevo_jax import Trainer

    cfg = moe_config(tiny_config)
    params = random_params(cfg)
    step = write_internevo_moe(tmp_path / "ie", params, cfg, tp=2)
    moe = ("model_type='INTERNLM_MoE'", "model.num_experts=4", "model.num_kv_attention_heads=4", "model.num_layers=2")
    info = f"dict(path='local:{step}', content=('model',), ckpt_type='internevo')"
    trainer = Trainer(tiny_config(*moe, f"ckpt.load_ckpt_info={info}", f"run_folder='{tmp_path}/r'"))
    state, meta = trainer.initial_state()
    assert meta["batch_count"] == 0
    assert_same(jax.device_get(state.params), params)
    assert any("loaded the model weights of the InternEvo PyTorch checkpoint" in r.getMessage() for r in logs)
