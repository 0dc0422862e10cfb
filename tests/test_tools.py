"""The command-line tools: --help, dump_batches round trip, alpaca_tokenizer masking, make_demo_text, bench_loader."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np

from internevo_jax import config as config_lib
from internevo_jax.data.loader import build_train_loader
from internevo_jax.data.packing import IGNORE_INDEX
from internevo_jax.data.tokenized import TokenizedFile, _fast_tokens, open_folder

from . import test_tokenized
from .conftest import ROOT

TOOLS = ROOT / "tools"
sp_model = test_tokenized.sp_model  # a 100-piece SentencePiece model; ids 1 and 2 are BOS and EOS


def run_tool(name, *args):
    return subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True, text=True)


def test_every_tool_has_help():
    names = sorted(p.name for p in TOOLS.glob("*.py") if p.name != "__init__.py")
    ours = {"alpaca_tokenizer.py", "bench_loader.py", "dump_batches.py", "make_demo_text.py", "tokenizer.py"}
    assert ours <= set(names)
    runs = {
        n: subprocess.Popen([sys.executable, str(TOOLS / n), "--help"], stdout=subprocess.PIPE, text=True)
        for n in names
    }
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("usage:"), name


# ------------------------------------------------------------------------------------------------------------------
# dump_batches: text -> tools/tokenizer.py -> tools/dump_batches.py, every value checked against the text (D-05)
# ------------------------------------------------------------------------------------------------------------------


def test_dump_batches_round_trip(tmp_path, sp_model, tiny_config):
    model, lines, sp = sp_model
    texts = lines[:60]
    (tmp_path / "raw.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "train" / "en" / "raw.bin"
    r = run_tool(
        "tokenizer.py", "--text_input_path", tmp_path / "raw.txt", "--bin_output_path", out, "--tokenizer_path", model
    )
    assert r.returncode == 0, r.stderr

    seq_len, micro_bsz, micro_num, dp, steps = 8, 2, 2, 2, 3
    overrides = [
        f"--config.data.train_folder='{tmp_path / 'train'}'",
        f"--config.data.seq_len={seq_len}",
        f"--config.data.micro_bsz={micro_bsz}",
        f"--config.data.micro_num={micro_num}",
        "--config.data.total_steps=10",
    ]
    dump = tmp_path / "out" / "batches.jsonl"
    args = ["--config", ROOT / "configs" / "tiny.py", *overrides, "--num_batches", steps, "--start_step", 1]
    r = run_tool("dump_batches.py", *args, "--dp", dp, "--output", dump)
    assert r.returncode == 0, r.stderr
    assert os.listdir(dump.parent) == ["batches.jsonl"]  # no temporary file left
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(x["step"], x["micro"], x["row"]) for x in records] == [
        (s, m, r) for s in range(1, 1 + steps) for m in range(micro_num) for r in range(dp)
    ]

    # The expected stream, independently of the loader: the texts' ids with BOS/EOS, in InternEvo's fixed shuffle.
    ids = [[1] + sp.encode(t) + [2] for t in texts]
    assert [sp.decode(x) for x in ids] == texts
    order = test_tokenized.internevo_shuffle(len(ids))
    stream = np.concatenate([ids[k] for k in order] + [[0]])  # a sentinel past the end
    sample_of = np.concatenate([[n] * len(ids[k]) for n, k in enumerate(order)] + [[-1]])
    offset_in_sample = np.concatenate([np.arange(len(ids[k])) for k in order])
    p = seq_len * micro_bsz
    packs = {tuple(stream[k * p : (k + 1) * p]): k for k in range((len(stream) - 1) // p)}
    assert len(packs) == (len(stream) - 1) // p  # the texts differ, so a pack's tokens name it

    cfg = tiny_config(*(o.removeprefix("--config.") for o in overrides))
    schedule = build_train_loader(cfg.data, dp)[0].schedule
    for x in records:
        got = {k: np.asarray(v) for k, v in x.items() if isinstance(v, list)}
        assert all(len(v) == p for v in got.values())
        k = packs[tuple(got["tokens"])]
        assert k == schedule.packs(x["step"])[x["micro"], x["row"]]  # the row the train step gets
        t = np.arange(k * p, (k + 1) * p)
        # labels: the sample's next token, across piece and pack edges; -100 after a sample's last token
        target = (sample_of[t + 1] == sample_of[t]) & (stream[t + 1] > 0)  # (label id 0 is never trained, D-08)
        np.testing.assert_array_equal(got["labels"], np.where(target, stream[t + 1], IGNORE_INDEX))
        # each sample's part of the pack is cut into pieces of <= seq_len; positions restart, a segment per piece
        first = sample_of[t] == sample_of[t[0]]
        within = offset_in_sample[t] - np.where(first, offset_in_sample[t[0]], 0)
        np.testing.assert_array_equal(got["positions"], within % seq_len)
        piece_starts = within % seq_len == 0
        assert piece_starts[0]
        np.testing.assert_array_equal(got["segment_ids"], np.cumsum(piece_starts))
        assert np.all(got["type_ids"] == 0)

    r = run_tool("dump_batches.py", *args, "--dp", dp, "--output", dump, "--config.data.total_steps=3")
    assert r.returncode == 2 and "run past data.total_steps 3" in r.stderr


# ------------------------------------------------------------------------------------------------------------------
# alpaca_tokenizer: only the answer is a target
# ------------------------------------------------------------------------------------------------------------------


def test_alpaca_tokenizer_masks_the_prompt(tmp_path, sp_model):
    model, lines, sp = sp_model
    records = [
        dict(instruction=lines[i], input=lines[i + 1] if i % 3 else "", output=lines[i + 2]) for i in range(0, 60, 3)
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    eoh, eoa, nl = 97, 98, 99  # this tokenizer has no <eoh>/<eoa>: stand-ins inside its 100 pieces
    out = tmp_path / "out"
    args = ["--split_ratio", 0.3, "--eoh_id", eoh, "--eoa_id", eoa, "--nl_id", nl]
    r = run_tool("alpaca_tokenizer.py", tmp_path / "alpaca.json", out, model, *args)
    assert r.returncode == 0, r.stderr

    valid = set(np.random.RandomState(0).choice(len(records), int(len(records) * 0.3)).tolist())  # InternEvo's pick
    assert 0 < len(valid) < int(len(records) * 0.3) + 1
    splits = {"train": [i for i in range(len(records)) if i not in valid], "valid": sorted(valid)}
    for split, picks in splits.items():
        folder = out / split / "en"
        assert sorted(os.listdir(folder)) == ["dataset.bin", "dataset.bin.meta"]
        assert np.load(folder / "dataset.bin.meta").dtype == np.int64
        f = TokenizedFile(folder / "dataset.bin", 0, vocab_size=100)
        assert len(f) == len(picks)
        for n, i in enumerate(picks):
            tokens = f.tokens(n).tolist()
            rec = records[i]
            user = f"<|User|>:{rec['instruction']}" + (f"\n{rec['input']}" if rec["input"] else "")
            prompt = sp.encode(user) + [eoh, nl] + sp.encode("<|Bot|>:")
            answer = sp.encode(rec["output"]) + [eoa, nl]
            assert tokens == [1] + [-t for t in prompt] + answer + [2]
            targets = [t for t in tokens[1:] if t > 0]  # what the loss sees as labels (after the BOS)
            assert sp.decode(targets[:-3]) == rec["output"] and targets[-3:] == [eoa, nl, 2]
    r = run_tool("alpaca_tokenizer.py", tmp_path / "missing.json", out, model)
    assert r.returncode == 2 and "does not exist" in r.stderr


# ------------------------------------------------------------------------------------------------------------------
# make_demo_text and bench_loader
# ------------------------------------------------------------------------------------------------------------------


def test_make_demo_text_writes_a_loadable_folder(tmp_path):
    r = run_tool("make_demo_text.py", "--output_dir", tmp_path / "demo", "--max_files", 3, "--vocab_size", 400)
    assert r.returncode == 0, r.stderr
    assert (
        "unigram entropy of the" in r.stdout
        and f"--config.data.train_folder='{tmp_path / 'demo' / 'train'}'" in r.stdout
    )
    assert (tmp_path / "demo" / "tokenizer.model").is_file()
    names, files = open_folder(tmp_path / "demo" / "train", vocab_size=400)
    assert names == ["code"] and [f.path.name for f in files] == ["stdlib.bin"] and len(files[0]) == 3
    sample = files[0].tokens(0)
    assert sample[0] == 1 and sample[-1] == 2 and np.all(sample > 0)
    # configs/demo_text.py reads the tool's default folder; pointed here, it trains on what the tool wrote
    train = tmp_path / "demo" / "train"
    cfg = config_lib.load(ROOT / "configs" / "demo_text.py")
    assert (cfg.data.train_folder, cfg.model.vocab_size) == ("RUN/demo_text_data/train", 2000)
    cfg = config_lib.load(
        ROOT / "configs" / "demo_text.py", [f"--config.data.train_folder='{train}'", "--config.data.micro_num=1"]
    )
    batch = build_train_loader(cfg.data, 1, vocab_size=cfg.model.vocab_size)[0][0]["batch"]
    assert batch["tokens"].shape == (1, 1, cfg.data.seq_len) and batch["tokens"].max() < 400


def test_bench_loader_runs(tmp_path):
    r = run_tool(
        "bench_loader.py", "--num_samples", 300, "--max_len", 200, "--seq_len", 64, "--steps", 5, "--warmup", 1
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 300 synthetic samples" in r.stdout and "tokens/s per host" in r.stdout


# ------------------------------------------------------------------------------------------------------------------
# The loader's fast line parser (found with tools/bench_loader.py) reads exactly what json reads, or defers to json
# ------------------------------------------------------------------------------------------------------------------


def test_fast_token_parser_agrees_with_json():
    rng = random.Random(0)
    fast = 0
    for _ in range(20000):
        inner = "".join(rng.choice("0123456789-, ") for _ in range(rng.randint(0, 12)))
        line = f'{{"tokens": [{inner}]}}'.encode()
        got = _fast_tokens(line)
        if got is None:
            continue
        fast += 1
        try:
            assert got.tolist() == json.loads(line)["tokens"], inner
        except json.JSONDecodeError:
            assert re.search(r"(^|[ ,-])0\d", inner), inner  # leading zeros: the one thing json rejects
    assert fast > 1000
    for ids in ([], [5], [1, -2, 92543], [-(10**15), 10**15]):
        line = json.dumps({"tokens": ids}).encode()
        assert _fast_tokens(line).tolist() == ids
    for line in (b'{"tokens": [1, 2], "x": 1}', b'{"tokens":[1,2]}', b'{"tokens": [0, 1]}', b'{"tokens": [1, 2.0]}'):
        assert _fast_tokens(line) is None  # other layouts, id 0 and floats go through json


def test_long_lines_and_a_last_line_without_newline(tmp_path):
    big = [[10**15 + i for i in range(300)], [3, 4], [-(10**12)] * 50]  # 18 bytes per id: more than one read
    path = tmp_path / "en" / "a.bin"
    test_tokenized.write_bin(path, big)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    f = TokenizedFile(path, 0)
    assert [f.tokens(i).tolist() for i in range(3)] == big
