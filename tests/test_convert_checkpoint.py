"""tools/convert_checkpoint.py: ours -> HF -> ours round trips bit-exact, the HF folder loads in transformers with
our logits, our tokenizer and our greedy output, the converted checkpoint starts a run, folders get the umask's
permissions, and bad arguments fail with the path and the fix."""

import io
import json
import logging
import os
import re
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import Trainer
from internevo_jax import config as config_lib
from internevo_jax.checkpoint.arrays import read_meta
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.checkpoint.step_folders import step_dirs
from internevo_jax.convert import hf_layout
from internevo_jax.errors import CheckpointMismatch
from internevo_jax.generate import Generator
from internevo_jax.model import build_model
from internevo_jax.monitoring.logger import get_logger
from internevo_jax.optim import init_loss_scale, make_optimizer
from internevo_jax.step import TrainState
from tools import convert_checkpoint

from . import test_tokenized
from .conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.py")
sp_model = test_tokenized.sp_model  # a 100-piece SentencePiece model (unigram); ids 1 and 2 are BOS and EOS


def load(*overrides):
    return config_lib.load(TINY, [f"--config.{o}" for o in overrides])


def random_model(cfg, seed=3):
    """A tiny model with random (not 1) norm weights, so every mapping is exercised."""
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 4))
    for holder in (params["layers"]["attention_norm"], params["layers"]["ffn_norm"], params["norm"]):
        holder["weight"] = holder["weight"] + 0.1 * jax.random.normal(next(keys), holder["weight"].shape)
    nnx.update(model, params)
    return model, params


def save_training_checkpoint(cfg, params, folder, step=7):
    """A checkpoint as a run writes it: params, optimizer state, counters and the resolved config."""
    tx = make_optimizer(cfg.adam, cfg.lr_scheduler, cfg.beta2_scheduler)
    state = TrainState(params, tx.init(params), init_loss_scale(cfg.grad_scaler, "float32"), jnp.int32(0))
    ckpt = config_lib.default_config().ckpt
    ckpt.update(dict(save_ckpt_folder=str(folder), checkpoint_every=1))
    writer = Checkpointer(ckpt)
    meta = dict(batch_count=step, step_count=step, num_consumed_tokens=0, data_state=None)
    writer.save(step, state, meta | dict(config=config_lib.to_json(cfg)))
    writer.close()


def run(*args):
    return convert_checkpoint.main([str(a) for a in args])


def assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def test_round_trip_matches_transformers_and_starts_a_run(tmp_path, capsys, monkeypatch):
    cfg = load("model.layer_norm_epsilon=1e-6")
    model, params = random_model(cfg)
    save_training_checkpoint(cfg, params, tmp_path / "run")

    # ours -> HF: the config comes from the checkpoint itself.
    assert run("--src", f"local:{tmp_path}/run", "--dst", tmp_path / "hf") == 0
    assert f"from {tmp_path}/run/7" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    # Without a tokenizer the special ids are the generation section's (InternEvo's defaults: BOS 1, EOS [2, 0]).
    assert {k: v for k, v in json.loads((tmp_path / "hf" / "config.json").read_text()).items() if "token_id" in k} == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == dict(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    # HF -> ours: one step folder holding the weights, bit-exact.
    assert (
        run(
            "--src",
            tmp_path / "hf",
            "--dst",
            tmp_path / "back",
            f"--config={TINY}",
            "--config.model.layer_norm_epsilon=1e-6",
        )
        == 0
    )
    assert [s for s, _ in step_dirs(tmp_path / "back")] == [0]
    assert read_meta(tmp_path / "back" / "0")["converted_from"] == str(tmp_path / "hf")
    assert not (tmp_path / "back" / ".lock").exists()
    again = load("model.layer_norm_epsilon=1e-6", "ckpt.enable_save_ckpt=False")
    restored = convert_checkpoint.read_params(tmp_path / "back" / "0", again)
    assert_equal(restored, params)

    # The converted folder as a run's checkpoint folder: auto_resume takes the weights, with a fresh optimizer.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    get_logger().addHandler(handler)
    try:
        trainer = Trainer(
            load(
                "model.layer_norm_epsilon=1e-6",
                "ckpt.enable_save_ckpt=True",
                f"ckpt.save_ckpt_folder='{tmp_path}/back'",
                "ckpt.checkpoint_every=10",
                f"run_folder='{tmp_path}/train'",
            )
        )
        state, meta = trainer.initial_state()
        trainer.checkpointer.close()
    finally:
        get_logger().removeHandler(handler)
    assert_equal(state.params, params)
    assert meta["batch_count"] == 0 and int(state.opt_state.count) == 0
    assert not np.asarray(state.opt_state.inner_state[0].mu["output"]).any()
    log = "\n".join(r.getMessage() for r in records)
    assert f"auto_resume: restored {tmp_path}/back step 0" in log and "model weights only: fresh optimizer" in log

    # It holds no optimizer state: asking for one is an error before compiling, naming what it holds.
    monkeypatch.setattr(Trainer, "_step_for", lambda *_: pytest.fail("compiled before checking"))
    info = f"dict(path='{tmp_path}/back', content=('model', 'optimizer'), ckpt_type='internevo')"
    with pytest.raises(CheckpointMismatch, match=r"asks for \['optimizer'\], but .*/back/0 holds only \['model'\]"):
        Trainer(load("ckpt.enable_save_ckpt=False", f"ckpt.load_ckpt_info={info}", f"run_folder='{tmp_path}/x'"))

    # transformers loads the exported folder without remote code; its logits are ours.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens = jax.random.randint(jax.random.key(0), (1, 24), 0, cfg.model.vocab_size)
    ours = np.asarray(model(tokens, jnp.arange(24)[None], jnp.ones((1, 24), jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(np.array(tokens)).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_bad_arguments_name_the_path_and_the_fix(tmp_path, capsys):
    cfg = load()
    _, params = random_model(cfg)
    save_training_checkpoint(cfg, params, tmp_path / "run")

    def error(*args):
        code = run(*args)
        return code, capsys.readouterr().err

    code, err = error("--src", tmp_path / "nope", "--dst", tmp_path / "out")
    assert code == 2 and f"--src {tmp_path}/nope does not exist" in err

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    code, err = error("--src", tmp_path / "run", "--dst", tmp_path / "taken")
    assert code == 2 and f"--dst {tmp_path}/taken exists and is not empty" in err and "--force" in err
    assert (tmp_path / "taken" / "keep.txt").exists()

    code, err = error("--src", tmp_path / "run", "--dst", tmp_path / "hf", "--step", 3)
    assert code == 2 and f"--step 3: {tmp_path}/run has no such step folder; it has steps [7]" in err

    code, err = error(
        "--src", tmp_path / "run", "--dst", tmp_path / "hf", f"--config={TINY}", "--config.model.hidden_size=128"
    )
    assert (
        code == 3
        and "params.layers.attention.wo: saved (2, 4, 16, 64) float32, the config expects (2, 4, 32, 128)" in err
    )
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # No InternLM2 layout: transformers cannot load it; the error says why and what to use.
    code, err = error("--src", tmp_path / "run", "--dst", tmp_path / "hf", "--layout", "internlm2")
    assert code == 2 and "transformers has no InternLM2 architecture" in err and "--layout llama" in err
    code, err = error("--src", tmp_path / "run", "--dst", tmp_path / "hf", "--tokenizer", tmp_path / "run")
    assert code == 2 and f"--tokenizer: tokenizer {tmp_path}/run: neither a SentencePiece .model nor" in err
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    assert run("--src", tmp_path / "run", "--dst", tmp_path / "taken", "--force") == 0
    assert (tmp_path / "taken" / "config.json").exists() and not (tmp_path / "taken" / "keep.txt").exists()
    code, err = error("--src", tmp_path / "taken", "--dst", tmp_path / "ours")
    assert code == 2 and "--config=FILE is needed" in err
    shutil.rmtree(tmp_path / "taken")


def test_conversions_show_a_progress_bar_on_stderr(tmp_path, capsys):
    cfg = load()
    _, params = random_model(cfg)
    save_training_checkpoint(cfg, params, tmp_path / "run")
    hf_count, leaves = len(hf_layout.to_hf(params, cfg.model)), len(jax.tree.leaves(params))

    def phase(err, label):
        """The phase's lines; stderr is no terminal here: a line per tenth of the bytes, then the closing one."""
        lines = [line for line in err.splitlines() if line.startswith(f"{label}:")]
        tenths = [int(re.match(rf"{label}: +(\d+)%", line)[1]) // 10 for line in lines]
        assert 2 <= len(lines) <= 10 and tenths == sorted(set(tenths)), lines  # at most one line per tenth
        return lines[-1]

    assert run("--src", tmp_path / "run", "--dst", tmp_path / "hf") == 0
    err = capsys.readouterr().err
    last = phase(err, "writing HF tensors")
    assert re.fullmatch(rf"writing HF tensors: 100% {hf_count}/{hf_count} tensors, (\S+ MB)/\1, \d+\.\ds", last), last
    assert "\r" not in err

    assert run("--src", tmp_path / "hf", "--dst", tmp_path / "back", f"--config={TINY}") == 0
    err = capsys.readouterr().err
    assert phase(err, "reading HF tensors").startswith(f"reading HF tensors: 100% {hf_count}/{hf_count} tensors, ")
    assert phase(err, "writing the checkpoint").startswith(f"writing the checkpoint: 100% {leaves}/{leaves} tensors")


def test_progress_bar_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = convert_checkpoint.ProgressBar(out)
    bar.start("writing HF tensors", 50, 50 * 4096)
    for _ in range(50):
        bar.advance(4096)
    bar.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn in place
    draws = text.split("\r")[1:]
    assert draws[0].startswith("writing HF tensors:   2% 1/50 tensors, 0.0 MB/0.2 MB, ")
    assert draws[-1].startswith("writing HF tensors: 100% 50/50 tensors, 0.2 MB/0.2 MB, ")
    assert len(draws) < 50  # at most ~10 redraws a second


def test_export_streams_into_shards_that_safetensors_reads(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cfg = load("model_type='LLAMA2'", "model.no_bias=False")
    _, params = random_model(cfg)
    params = jax.tree.map(np.asarray, params)
    folder = hf_layout.save_hf(params, cfg.model, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    # Our writer's files, read by safetensors itself: every tensor is the one to_hf makes.
    want = {name: a.astype(ml_dtypes.bfloat16) for name, a in hf_layout.to_hf(params, cfg.model).items()}
    got = {}
    for file in files:
        with safetensors.safe_open(str(folder / file), framework="numpy") as f:
            got |= {name: f.get_tensor(name) for name in f.keys()}
    assert got.keys() == want.keys() and index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for name, a in want.items():
        np.testing.assert_array_equal(got[name].view(np.uint16), a.view(np.uint16), err_msg=name)


def test_hf_export_carries_the_training_tokenizer_and_our_greedy_output(tmp_path, sp_model):
    """AutoTokenizer on the export encodes as training did (BOS + SentencePiece pieces) and transformers' greedy
    generate, with the export's generation_config.json, gives our Generator's tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, lines, sp = sp_model
    cfg = load("model.vocab_size=100", "model.layer_norm_epsilon=1e-6", "generation.do_sample=False")
    model, params = random_model(cfg)
    params["output"] = 5 * params["output"]  # logits far apart: greedy paths do not hinge on rounding
    nnx.update(model, params)
    save_training_checkpoint(cfg, params, tmp_path / "run")
    assert run("--src", tmp_path / "run", "--dst", tmp_path / "hf", "--tokenizer", f"local:{path}") == 0
    hf = tmp_path / "hf"
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (1, 2, None)
    assert json.loads((hf / "special_tokens_map.json").read_text()) == dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    texts = ["import os", "  kalo   mine \n sura\tto ", "", "Zürich ①", *lines[:50]]
    assert [tokenizer(t).input_ids for t in texts] == [[sp.bos_id(), *sp.encode(t)] for t in texts]
    assert tokenizer.decode(tokenizer(lines[0]).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(lines[0]))

    # A Hugging Face tokenizer folder (this export) is copied as it is, and gives the ids.
    assert run("--src", tmp_path / "run", "--dst", tmp_path / "hf2", "--tokenizer", hf) == 0
    copied = ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in (tmp_path / "hf2").iterdir() if p.name.startswith(("tok", "spec"))) == copied
    assert all((tmp_path / "hf2" / n).read_bytes() == (hf / n).read_bytes() for n in copied)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf2" / name).read_text()) == json.loads((hf / name).read_text())

    prompts = [tokenizer(" ".join(line.split()[:3])).input_ids for line in lines[:4]]
    outputs = Generator(model, cfg.generation).generate(prompts)
    assert {o.finish_reason for o in outputs} == {"eos", "length"}  # both ways of stopping are compared
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for prompt, ours in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([prompt]), max_length=cfg.generation.max_length, do_sample=False)
        assert theirs[0, len(prompt) :].tolist() == ours.tokens


def test_exported_folders_get_the_umask_permissions(tmp_path):
    """A folder made by mkdtemp is 0700 and keeps that when renamed into place: teammates could not read it."""
    cfg = load()
    _, params = random_model(cfg)
    save_training_checkpoint(cfg, params, tmp_path / "run")
    old = os.umask(0o002)
    try:
        assert run("--src", tmp_path / "run", "--dst", tmp_path / "hf") == 0
        assert run("--src", tmp_path / "hf", "--dst", tmp_path / "back", f"--config={TINY}") == 0
        direct = hf_layout.save_hf(jax.tree.map(np.asarray, params), cfg.model, tmp_path / "direct")
    finally:
        os.umask(old)
    for folder in (tmp_path / "hf", tmp_path / "back", direct):
        for path in [folder, *folder.rglob("*")]:
            want = 0o775 if path.is_dir() else 0o664
            assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))
