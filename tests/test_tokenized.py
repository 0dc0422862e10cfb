"""InternEvo's tokenized data (D-02..D-08): .bin/.meta, folder types, bad input, packing modes, tools/tokenizer.py."""

import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from internevo_jax.data.loader import build_train_loader
from internevo_jax.data.packing import IGNORE_INDEX, ConcatPacks, PackedDataset
from internevo_jax.data.tokenized import DataError, TokenizedFile, find_bin_files, open_folder

from .conftest import ROOT

TOKENIZER = ROOT / "tools" / "tokenizer.py"


def write_bin(path, samples, meta_dtype=np.int64, meta=None):
    """Writes ``samples`` as InternEvo's .bin (json.dumps + newline) and its .bin.meta; returns the meta rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [(json.dumps({"tokens": [int(t) for t in s]}) + "\n").encode() for s in samples]
    path.write_bytes(b"".join(lines))
    if meta is None:
        offsets = np.cumsum([0] + [len(line) for line in lines[:-1]])
        meta = np.stack([offsets, [len(s) for s in samples]], axis=1) if samples else np.zeros((0, 2))
    meta = np.asarray(meta, dtype=meta_dtype)
    save_meta(path, meta)
    return meta


def save_meta(bin_path, meta):
    with open(f"{bin_path}.meta", "wb") as f:  # np.save on a path would append .npy
        np.save(f, meta)


def random_samples(rng, n, lo=1, hi=30, vocab=50):
    """Samples with some negative (non-target) ids, as InternEvo's SFT data has."""
    out = []
    for _ in range(n):
        s = rng.randint(1, vocab, size=rng.randint(lo, hi))
        out.append(np.where(rng.rand(len(s)) < 0.2, -s, s))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_reads_int32_and_int64_meta(tmp_path, dtype):
    samples = random_samples(np.random.RandomState(0), 20)
    meta = write_bin(tmp_path / "en" / "a.bin", samples, dtype)
    assert np.load(f"{tmp_path}/en/a.bin.meta").dtype == dtype
    f = TokenizedFile(tmp_path / "en" / "a.bin", type_id=3)
    assert len(f) == 20 and f.type_id(5) == 3
    np.testing.assert_array_equal(f.lengths, meta[:, 1])
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(f.tokens(i), s)


def test_only_tokens_key_is_read_and_min_length_drops_samples(tmp_path):
    path = tmp_path / "en" / "a.bin"
    path.parent.mkdir()
    lines = [json.dumps({"tokens": [1] * n, "meta": "x"}) + "\n" for n in (3, 7, 5, 9)]
    path.write_text("".join(lines))
    save_meta(path, np.array([[sum(map(len, lines[:i])), n] for i, n in enumerate((3, 7, 5, 9))]))
    f = TokenizedFile(path, 0, min_length=5)  # fewer than 5 tokens -> dropped (InternEvo: lengths >= min_length)
    assert f.lengths.tolist() == [7, 5, 9] and f.tokens(1).tolist() == [1] * 5


def test_min_length_dict_per_file(tmp_path):
    write_bin(tmp_path / "en" / "pile-arxiv.bin", [[1] * 3, [1] * 10])
    write_bin(tmp_path / "en" / "books.bin", [[1] * 3, [1] * 10])
    _, files = open_folder(tmp_path, min_length=0, min_length_dict={"arxiv": 5})
    assert {f.path.name: len(f) for f in files} == {"books.bin": 2, "pile-arxiv.bin": 1}
    with pytest.raises(DataError, match=r"pile-arxiv\.bin matches several data.min_length_dict keys"):
        open_folder(tmp_path, min_length_dict={"arxiv": 5, "pile": 1})


def test_type_ids_from_sorted_top_level_folders(tmp_path):
    root = tmp_path / "train"
    for rel in ("en/b.bin", "en/a.bin", "en/sub/c.bin", "cn/x.bin", "code/deep/er/y.bin"):
        write_bin(root / rel, [[1, 2, 3]])
    (root / "ja").mkdir()  # an empty type folder still takes its place in the sorted names
    other = tmp_path / "elsewhere"
    write_bin(other / "z.bin", [[4, 5]])
    os.symlink(other, root / "en" / "linked")  # InternEvo walks with followlinks=True
    (root / "notes.txt").write_text("ignored")
    names, bins = find_bin_files(root)
    assert names == ["cn", "code", "en", "ja"]
    got = [(os.path.relpath(p, root), t) for p, t in bins]
    # pre-order, files before sub-folders, everything sorted (os.walk with dirs.sort() and sorted(files))
    assert got == [
        ("cn/x.bin", 0),
        ("code/deep/er/y.bin", 1),
        ("en/a.bin", 2),
        ("en/b.bin", 2),
        ("en/linked/z.bin", 2),
        ("en/sub/c.bin", 2),
    ]


# ------------------------------------------------------------------------------------------------------------------
# Bad input: every error names the file, and the line and byte offset where there is one
# ------------------------------------------------------------------------------------------------------------------


def test_malformed_json_line(tmp_path):
    path = tmp_path / "en" / "a.bin"
    write_bin(path, [[1, 2], [3, 4, 5], [6]])
    text = path.read_bytes().replace(b"[3, 4, 5]", b"[3, 4, 5")
    path.write_bytes(text)
    meta = np.load(f"{path}.meta")
    meta[2, 0] -= 1
    save_meta(path, meta)
    f = TokenizedFile(path, 0)
    f.tokens(0)
    with pytest.raises(DataError, match=rf"{path}, line 2 \(byte offset {meta[1, 0]}\): malformed line"):
        f.tokens(1)


@pytest.mark.parametrize(
    "line,why",
    [('{"tokens": [1, 2.5]}', "list of integers"), ('{"text": "hi"}', "KeyError"), ("[1, 2]", "TypeError")],
)
def test_line_without_integer_tokens(tmp_path, line, why):
    path = tmp_path / "en" / "a.bin"
    path.parent.mkdir()
    path.write_text(line + "\n")
    save_meta(path, np.array([[0, 2]]))
    with pytest.raises(DataError, match=rf"a\.bin, line 1 \(byte offset 0\): malformed line.*{why}"):
        TokenizedFile(path, 0).tokens(0)


def test_meta_past_the_end_of_the_bin(tmp_path):
    path = tmp_path / "en" / "a.bin"
    meta = write_bin(path, [[1, 2], [3]])
    meta[1, 0] = path.stat().st_size
    save_meta(path, meta)
    with pytest.raises(DataError, match=r"a\.bin\.meta: row 1 has a byte offset past the end of the \d+-byte \.bin"):
        TokenizedFile(path, 0)


def test_negative_offset_hints_at_int32_overflow(tmp_path):
    path = tmp_path / "en" / "a.bin"
    meta = write_bin(path, [[1, 2], [3]], np.int32)
    meta[1, 0] = -5
    save_meta(path, meta)
    with pytest.raises(DataError, match=r"a\.bin\.meta: row 1 has a negative byte offset \(an int32 index"):
        TokenizedFile(path, 0)


def test_meta_not_at_a_line_start_is_caught_when_opened(tmp_path):
    path = tmp_path / "en" / "a.bin"
    meta = write_bin(path, [[1, 2], [3, 4]])
    meta[1, 0] += 2
    save_meta(path, meta)
    with pytest.raises(DataError, match=rf"a\.bin, line 2 \(byte offset {meta[1, 0]}\): row 1 .* not at a line start"):
        TokenizedFile(path, 0)


def test_meta_count_disagreeing_with_the_line(tmp_path):
    path = tmp_path / "en" / "a.bin"
    meta = write_bin(path, [[1, 2], [3, 4, 5]])
    meta[1, 1] = 4
    save_meta(path, meta)
    f = TokenizedFile(path, 0)  # only a read can see it: counting tokens needs the whole line
    with pytest.raises(DataError, match=r"a\.bin, line 2 \(byte offset \d+\): the line has 3 tokens but row 1"):
        f.tokens(1)


def test_meta_that_is_not_an_index(tmp_path):
    path = tmp_path / "en" / "a.bin"
    write_bin(path, [[1, 2]])
    save_meta(path, np.array([0, 2]))
    with pytest.raises(DataError, match=r"a\.bin\.meta: expected an integer array of shape \(N, 2\)"):
        TokenizedFile(path, 0)
    (tmp_path / "en" / "a.bin.meta").write_text("(0, 2)")
    with pytest.raises(DataError, match=r"a\.bin\.meta: not a NumPy \.npy index"):
        TokenizedFile(path, 0)


def test_bin_without_meta_and_meta_without_bin(tmp_path):
    write_bin(tmp_path / "en" / "a.bin", [[1, 2]])
    os.remove(tmp_path / "en" / "a.bin.meta")
    with pytest.raises(DataError, match=r"en/a\.bin: no index a\.bin\.meta"):
        open_folder(tmp_path)
    os.remove(tmp_path / "en" / "a.bin")
    write_bin(tmp_path / "en" / "b.bin", [[1, 2]])
    os.remove(tmp_path / "en" / "b.bin")
    with pytest.raises(DataError, match=r"en/b\.bin\.meta has no b\.bin next to it"):
        open_folder(tmp_path)


def test_symlink_cycle(tmp_path):
    write_bin(tmp_path / "en" / "a.bin", [[1, 2]])
    os.symlink(tmp_path / "en", tmp_path / "en" / "again")
    with pytest.raises(DataError, match=r"en/again links back to .*: a symlink cycle"):
        open_folder(tmp_path)


def test_bin_directly_in_the_root(tmp_path):
    write_bin(tmp_path / "en" / "a.bin", [[1, 2]])
    write_bin(tmp_path / "stray.bin", [[1, 2]])
    with pytest.raises(DataError, match=r"stray\.bin is directly in the data folder"):
        open_folder(tmp_path)


def test_missing_and_empty_datasets(tmp_path, tiny_config):
    with pytest.raises(DataError, match=r"nope does not exist"):
        open_folder(tmp_path / "nope")
    (tmp_path / "en").mkdir()
    with pytest.raises(DataError, match=r"has no \.bin files under its type folders \['en'\]"):
        open_folder(tmp_path)
    write_bin(tmp_path / "en" / "a.bin", [[1] * 40, [2] * 40])
    cfg = tiny_config(f"data.train_folder='{tmp_path}'", "data.min_length=50", "data.micro_num=1")
    with pytest.raises(DataError, match=r"1 \.bin files hold 0 samples of >= data.min_length 50"):
        build_train_loader(cfg.data, 1)
    cfg = tiny_config(f"data.train_folder='{tmp_path}'", "data.micro_num=1")  # 80 tokens, packs of 64 -> 1 pack
    assert len(build_train_loader(cfg.data, 1)[0].packs) == 1
    write_bin(tmp_path / "en" / "a.bin", [[1] * 30, [2] * 30])
    with pytest.raises(DataError, match=r"\(60 tokens\), which make no pack of .* = 64 tokens"):
        build_train_loader(cfg.data, 1)


def test_token_ids_outside_the_vocabulary(tmp_path):
    path = tmp_path / "en" / "a.bin"
    write_bin(path, [[1, -99, 99], [5, 100], [-100, 3]])
    f = TokenizedFile(path, 0, vocab_size=100)
    f.tokens(0)  # -(V-1) and V-1 are fine
    with pytest.raises(DataError, match=r"a\.bin, line 2 \(byte offset \d+\): token id 100 is outside \[-99, 100\)"):
        f.tokens(1)
    with pytest.raises(DataError, match=r"a\.bin, line 3 .*token id -100 is outside"):
        f.tokens(2)


def test_loader_bounds_token_ids_by_the_model_vocab(tmp_path, tiny_config):
    write_bin(tmp_path / "en" / "a.bin", [[300] * 70])
    cfg = tiny_config(f"data.train_folder='{tmp_path}'", "data.micro_num=1")
    source, _ = build_train_loader(cfg.data, 1, vocab_size=cfg.model.vocab_size)
    with pytest.raises(DataError, match=r"a\.bin, line 1 .*token id 300 is outside \[-255, 256\)"):
        source[0]


# ------------------------------------------------------------------------------------------------------------------
# Packing modes against InternEvo's own list code, ported literally (D-05 build_pack, D-06, D-07 build_unpack)
# ------------------------------------------------------------------------------------------------------------------


def internevo_shuffle(n):
    order = np.arange(n)
    np.random.RandomState(1024).shuffle(order)
    return order


def internevo_cut(samples, seq_len, packed_length, item):
    """``PackedDatasetWithCut.mapping`` + ``build_pack``."""
    order = internevo_shuffle(len(samples))
    lens = [len(samples[i]) for i in order]
    acm = list(np.cumsum(lens))

    def cal_map(c):
        return np.searchsorted(acm, (c + 1) * packed_length, side="left")

    pre_pos, pre_token_id = 0, 0
    if item > 0:
        pre_pos = cal_map(item - 1)
        pre_token_id = lens[pre_pos] - (acm[pre_pos] - item * packed_length)
        if pre_token_id == lens[pre_pos]:
            pre_pos, pre_token_id = pre_pos + 1, 0
    pos = cal_map(item)
    token_id = lens[pos] - (acm[pos] - (item + 1) * packed_length)
    pack, cu, indexes, labels = [], [0], [], []

    def add(chunk, last_label):
        pack.extend(chunk)
        labels.extend(list(chunk[1:]) + [last_label])
        full, left = divmod(len(chunk), seq_len)
        for _ in range(full):
            cu.append(cu[-1] + seq_len)
            indexes.extend(range(seq_len))
        if left:
            cu.append(cu[-1] + left)
            indexes.extend(range(left))

    while pre_pos < pos:
        add(list(samples[order[pre_pos]][pre_token_id:]), -100)
        pre_pos, pre_token_id = pre_pos + 1, 0
    sample = list(samples[order[pos]])
    add(sample[pre_token_id:token_id], -100 if token_id == len(sample) else sample[token_id])
    return pack, labels, cu, indexes


def internevo_into_one(samples, seq_len, packed_length, item):
    """``PackedDatasetWithoutCuSeqlen.__getitem__``."""
    order = internevo_shuffle(len(samples))
    cum = np.cumsum([len(samples[i]) for i in order])

    def find(offset):
        idx = np.searchsorted(cum, offset, side="right")
        return (idx, offset) if idx == 0 else (idx, offset - cum[idx - 1])

    (s_idx, s_len), (e_idx, e_len) = find(item * packed_length), find((item + 1) * packed_length)
    pack, labels = [], []
    if s_idx == e_idx:
        chunks = [list(samples[order[s_idx]][s_len:e_len])]
    else:
        chunks = [list(samples[order[s_idx]][s_len:])]
        chunks += [list(samples[order[i]]) for i in range(s_idx + 1, e_idx)]
        if e_len:
            chunks.append(list(samples[order[e_idx]][:e_len]))
    for c in chunks:
        pack.extend(c)
        labels.extend(c[1:] + [-100])
    bsz = packed_length // seq_len
    return pack, labels, [i * seq_len for i in range(bsz + 1)], list(range(seq_len)) * bsz


def internevo_unpack_rows(samples, seq_len, micro_bsz, item):
    """``build_unpack`` (v0.3.4: samples [i*micro_bsz, (i+1)*micro_bsz)) then the model's ``unpack_data`` rows."""
    order = internevo_shuffle(len(samples))
    rows_t, rows_l = [], []
    for k in range(item * micro_bsz, (item + 1) * micro_bsz):
        chunk = list(samples[order[k]][:seq_len]) if k < len(order) else []
        pad = seq_len - len(chunk)
        rows_t.append(chunk + [0] * pad)
        rows_l.append((chunk[1:] + [-100] if chunk else []) + [-100] * pad)
    return rows_t, rows_l


def collate(tokens, labels):
    """``packed_collate_fn``: abs inputs, labels <= 0 ignored."""
    return np.abs(tokens), np.where(np.asarray(labels) > 0, labels, IGNORE_INDEX)


def segments_of(cu):
    return np.repeat(np.arange(1, len(cu)), np.diff(cu))


class Samples:
    def __init__(self, samples, type_ids=None):
        self.data = samples
        self.lengths = np.array([len(s) for s in samples])
        self.types = type_ids

    def __len__(self):
        return len(self.data)

    def tokens(self, i):
        return self.data[i]

    def type_id(self, i):
        return 0 if self.types is None else self.types[i]


CASES = [(4, 2, 0), (4, 3, 1), (8, 2, 2), (3, 4, 3), (16, 1, 4)]  # seq_len, micro_bsz, seed


@pytest.mark.parametrize("seq_len,micro_bsz,seed", CASES)
def test_default_mode_matches_internevo(seq_len, micro_bsz, seed):
    samples = random_samples(np.random.RandomState(seed), 25, hi=3 * seq_len * micro_bsz)
    packs = PackedDataset(Samples(samples), seq_len, micro_bsz)
    p = seq_len * micro_bsz
    assert len(packs) == sum(map(len, samples)) // p
    for i in range(len(packs)):
        tokens, labels, cu, indexes = internevo_cut(samples, seq_len, p, i)
        want_t, want_l = collate(tokens, labels)
        got = packs[i]
        np.testing.assert_array_equal(got["tokens"], want_t)
        np.testing.assert_array_equal(got["labels"], want_l)
        np.testing.assert_array_equal(got["positions"], indexes)
        np.testing.assert_array_equal(got["segment_ids"], segments_of(cu))


@pytest.mark.parametrize("seq_len,micro_bsz,seed", CASES)
def test_pack_sample_into_one_matches_internevo(seq_len, micro_bsz, seed):
    samples = random_samples(np.random.RandomState(seed), 25, hi=3 * seq_len * micro_bsz)
    types = np.random.RandomState(seed).randint(0, 3, size=25)
    packs = PackedDataset(Samples(samples, types), seq_len, micro_bsz, pack_sample_into_one=True)
    p = seq_len * micro_bsz
    assert len(packs) == sum(map(len, samples)) // p
    stream_types = np.concatenate([[types[i]] * len(samples[i]) for i in internevo_shuffle(25)])
    for i in range(len(packs)):
        tokens, labels, cu, indexes = internevo_into_one(samples, seq_len, p, i)
        want_t, want_l = collate(tokens, labels)
        got = packs[i]
        np.testing.assert_array_equal(got["tokens"], want_t)
        np.testing.assert_array_equal(got["labels"], want_l)
        np.testing.assert_array_equal(got["positions"], indexes)
        np.testing.assert_array_equal(got["segment_ids"], segments_of(cu))
        np.testing.assert_array_equal(got["type_ids"], stream_types[i * p : (i + 1) * p])


@pytest.mark.parametrize("seq_len,micro_bsz,seed", CASES)
def test_unpacked_mode_matches_internevo(seq_len, micro_bsz, seed):
    samples = random_samples(np.random.RandomState(seed), 25, hi=2 * seq_len)
    types = np.random.RandomState(seed).randint(1, 3, size=25)
    packs = PackedDataset(Samples(samples, types), seq_len, micro_bsz, use_packed_dataset=False)
    assert len(packs) == sum(map(len, samples)) // (seq_len * micro_bsz)  # InternEvo's token-based length (D-07)
    order = internevo_shuffle(25)
    for i in range(len(packs)):
        rows_t, rows_l = internevo_unpack_rows(samples, seq_len, micro_bsz, i)
        want_t, want_l = collate(np.concatenate(rows_t), np.concatenate(rows_l))
        got = packs[i]
        np.testing.assert_array_equal(got["tokens"], want_t)
        np.testing.assert_array_equal(got["labels"], want_l)
        for j in range(micro_bsz):
            row = slice(j * seq_len, (j + 1) * seq_len)
            k = i * micro_bsz + j
            n = min(len(samples[order[k]]), seq_len) if k < len(order) else 0
            seg, pos, typ = got["segment_ids"][row], got["positions"][row], got["type_ids"][row]
            np.testing.assert_array_equal(pos[:n], np.arange(n))  # the sample: one segment from position 0
            assert len(set(seg[:n])) <= 1 and (n == seq_len or len(set(seg[n:])) == 1 and seg[n] not in seg[:n])
            assert all(typ[:n] == (types[order[k]] if n else 0)) and all(typ[n:] == 0)
        # rows never share a segment: attention stays inside a row
        rows = got["segment_ids"].reshape(micro_bsz, seq_len)
        assert all(not set(rows[a]) & set(rows[b]) for a in range(micro_bsz) for b in range(a))


MODES = {
    "default": (),
    "pack_sample_into_one": ("data.pack_sample_into_one=True",),
    "unpacked": ("data.use_packed_dataset=False",),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_bin_is_packed_on_its_own_then_concatenated(tmp_path, tiny_config, mode):
    rng = np.random.RandomState(7)
    a, b = random_samples(rng, 30, hi=40), random_samples(rng, 20, hi=40)
    a[3] = np.zeros(0, np.int64)  # an empty sample (min_length 0 keeps it) adds no tokens; InternEvo would assert
    write_bin(tmp_path / "cn" / "a.bin", a)
    write_bin(tmp_path / "en" / "b.bin", b)
    cfg = tiny_config(f"data.train_folder='{tmp_path}'", "data.seq_len=8", "data.micro_num=1", *MODES[mode])
    source, types = build_train_loader(cfg.data, 1)
    assert types == ["cn", "en"] and isinstance(source.packs, ConcatPacks)
    flags = dict(pack_sample_into_one=cfg.data.pack_sample_into_one, use_packed_dataset=cfg.data.use_packed_dataset)
    per_file = [PackedDataset(Samples(s, [t] * len(s)), 8, 2, **flags) for t, s in enumerate((a, b))]
    expected = [part[i] for part in per_file for i in range(len(part))]
    assert len(per_file[0]) == sum(map(len, a)) // 16 and len(per_file[1]) == sum(map(len, b)) // 16
    assert len(source.packs) == len(expected)
    for i, want in enumerate(expected):
        for k, v in want.items():
            np.testing.assert_array_equal(source.packs[i][k], v, err_msg=f"pack {i} {k}")
    # no pack mixes the two files
    assert {int(t) for i in range(len(per_file[0])) for t in source.packs[i]["type_ids"]} == {0}


# ------------------------------------------------------------------------------------------------------------------
# tools/tokenizer.py and a round trip text -> .bin -> batch
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 100-piece SentencePiece model trained in a fraction of a second; ids 1 and 2 are BOS and EOS."""
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    syllables = "ka lo mi ne su ra to vi ze pu da fe go hi ju qu wy xo by ce".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=100, minloglevel=2
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(model.getvalue())
    return path, lines, sentencepiece.SentencePieceProcessor(model_file=str(path))


def run_tokenizer(*args):
    return subprocess.run([sys.executable, str(TOKENIZER), *map(str, args)], capture_output=True, text=True)


def test_tokenizer_inputs_and_format(tmp_path, sp_model):
    model, lines, sp = sp_model
    texts = lines[:30]
    (tmp_path / "in.txt").write_text("\n".join(f"  {t}  " for t in texts[:15]) + "\n\n \n" + "\n".join(texts[15:]))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "in.json").write_text(json.dumps([{"text": t} for t in texts[:10]] + texts[10:]))
    expected = [[1] + sp.encode(t) + [2] for t in texts]  # InternEvo: add_bos_token=True, add_eos_token=True
    outputs = []
    for kind in ("txt", "jsonl", "json"):
        out = tmp_path / kind / "en" / "data.bin"
        r = run_tokenizer(
            "--text_input_path", tmp_path / f"in.{kind}", "--bin_output_path", out, "--tokenizer_path", model
        )
        assert r.returncode == 0, r.stderr
        assert "wrote 30 samples" in r.stdout
        outputs.append(out.read_bytes())
        meta = np.load(f"{out}.meta")
        assert meta.dtype == np.int64 and meta.shape == (30, 2)
        lines_out = out.read_bytes().splitlines(keepends=True)
        assert [json.loads(x)["tokens"] for x in lines_out] == expected
        assert lines_out[0] == (json.dumps({"tokens": expected[0]}) + "\n").encode()  # default separators
        np.testing.assert_array_equal(meta[:, 0], np.cumsum([0] + [len(x) for x in lines_out[:-1]]))
        np.testing.assert_array_equal(meta[:, 1], [len(e) for e in expected])
        f = TokenizedFile(out, 0, vocab_size=100)
        assert all(f.tokens(i).tolist() == e for i, e in enumerate(expected))
    assert outputs[0] == outputs[1] == outputs[2]
    assert sorted(os.listdir(tmp_path / "txt" / "en")) == ["data.bin", "data.bin.meta"]  # no temporary files left


def test_tokenizer_errors_leave_no_files(tmp_path, sp_model):
    model = sp_model[0]
    r = run_tokenizer("--help")
    assert r.returncode == 0 and "--text_input_path" in r.stdout and "--tokenizer_path" in r.stdout
    (tmp_path / "in.txt").write_text("hello\n")
    out = tmp_path / "en" / "x.bin"
    r = run_tokenizer(
        "--text_input_path", tmp_path / "in.txt", "--bin_output_path", out, "--tokenizer_path", "no.model"
    )
    assert r.returncode == 2 and "--tokenizer_path no.model does not exist" in r.stderr
    # a bad record half way: the error names the line and nothing is left behind, not even temporary files
    (tmp_path / "in.jsonl").write_text('{"text": "ka lo"}\n{"text": "mi ne"}\n{"text": broken\n{"text": "su"}\n')
    r = run_tokenizer("--text_input_path", tmp_path / "in.jsonl", "--bin_output_path", out, "--tokenizer_path", model)
    assert r.returncode == 1 and "in.jsonl, line 3: not a JSON record" in r.stderr
    assert os.listdir(tmp_path / "en") == []
    (tmp_path / "in.jsonl").write_text('{"body": "ka lo"}\n')
    r = run_tokenizer("--text_input_path", tmp_path / "in.jsonl", "--bin_output_path", out, "--tokenizer_path", model)
    assert r.returncode == 1 and "line 1: expected a string or a record with a string 'text' field" in r.stderr
    assert os.listdir(tmp_path / "en") == []
    # an existing output is never clobbered silently
    r = run_tokenizer("--text_input_path", tmp_path / "in.txt", "--bin_output_path", out, "--tokenizer_path", model)
    assert r.returncode == 0
    r = run_tokenizer("--text_input_path", tmp_path / "in.txt", "--bin_output_path", out, "--tokenizer_path", model)
    assert r.returncode == 2 and "already exist; pass --overwrite" in r.stderr
    r = run_tokenizer(
        "--text_input_path", tmp_path / "in.txt", "--bin_output_path", out, "--tokenizer_path", model, "--overwrite"
    )
    assert r.returncode == 0 and sorted(os.listdir(tmp_path / "en")) == ["x.bin", "x.bin.meta"]


def test_round_trip_text_to_batch(tmp_path, sp_model, tiny_config):
    model, lines, sp = sp_model
    texts = lines[:60]
    (tmp_path / "raw.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "train" / "cn" / "raw.bin"
    r = run_tokenizer("--text_input_path", tmp_path / "raw.txt", "--bin_output_path", out, "--tokenizer_path", model)
    assert r.returncode == 0, r.stderr
    seq_len, micro_bsz = 8, 2
    cfg = tiny_config(f"data.train_folder='{tmp_path / 'train'}'", f"data.seq_len={seq_len}", "data.total_steps=4")
    source, types = build_train_loader(cfg.data, dp_size=2, vocab_size=cfg.model.vocab_size)
    assert types == ["cn"]

    # The expected stream, independently: the texts' ids with BOS/EOS, in InternEvo's fixed shuffle.
    ids = [[1] + sp.encode(t) + [2] for t in texts]
    assert [sp.decode(x) for x in ids] == texts  # the ids are the text
    order = internevo_shuffle(len(ids))
    stream = np.concatenate([ids[k] for k in order] + [[0]])  # a sentinel past the end
    sample_of = np.concatenate([[n] * len(ids[k]) for n, k in enumerate(order)] + [[-1]])
    offset_in_sample = np.concatenate([np.arange(len(ids[k])) for k in order])
    p = seq_len * micro_bsz
    assert len(source.packs) == (len(stream) - 1) // p

    for step in range(4):
        batch = source[step]["batch"]
        for m, row in np.ndindex(*batch["tokens"].shape[:2]):
            pack = int(source.schedule.packs(step)[m, row])
            t = np.arange(pack * p, (pack + 1) * p)
            got = {k: v[m, row] for k, v in batch.items()}
            np.testing.assert_array_equal(got["tokens"], stream[t])
            # the next token of the same sample, across piece and pack edges; -100 after a sample's last token
            target = (sample_of[t + 1] == sample_of[t]) & (stream[t + 1] > 0)
            np.testing.assert_array_equal(got["labels"], np.where(target, stream[t + 1], IGNORE_INDEX))
            # a fragment is the part of a sample inside the pack; it is cut into seq_len pieces, positions restart
            first = sample_of[t] == sample_of[t[0]]
            within = offset_in_sample[t] - np.where(first, offset_in_sample[t[0]], 0)
            np.testing.assert_array_equal(got["positions"], within % seq_len)
            starts = np.flatnonzero(within % seq_len == 0)
            np.testing.assert_array_equal(np.flatnonzero(np.diff(got["segment_ids"])) + 1, starts[starts > 0])
            assert got["segment_ids"][0] == 1 and np.all(np.diff(got["segment_ids"]) >= 0)
            assert np.all(got["type_ids"] == 0)


def test_trainer_runs_on_a_tokenized_folder(tmp_path, tiny_config):
    from internevo_jax import Trainer

    rng = np.random.RandomState(0)
    write_bin(tmp_path / "data" / "cn" / "a.bin", random_samples(rng, 120, hi=40, vocab=256))
    write_bin(tmp_path / "data" / "en" / "nested" / "b.bin", random_samples(rng, 80, hi=40, vocab=256))
    cfg = tiny_config(f"data.train_folder='{tmp_path / 'data'}'", "data.total_steps=3", f"run_folder='{tmp_path}/run'")
    trainer = Trainer(cfg)
    assert trainer.dataset_types == ["cn", "en"]
    summary = trainer.fit()
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
