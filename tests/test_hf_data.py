"""Streaming text data (D-15, data.type hf/streaming): local files, on-the-fly tokenizing, InternEvo packing, resume."""

import gzip
import io
import itertools
import json
import random
import sys
import types

import numpy as np
import pytest

from internevo_jax.config import ConfigError
from internevo_jax.data import hf, text
from internevo_jax.data.loader import build_train_loader, iterate
from internevo_jax.data.packing import IGNORE_INDEX
from internevo_jax.data.tokenized import DataError

# ------------------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    """(texts, a 60-piece SentencePiece model path, its processor); ids 1 and 2 are BOS and EOS."""
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    syllables = "ka lo mi ne su ra to vi ze pu da fe go hi ju".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(100)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(120)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=60, minloglevel=2
    )
    return texts, model.getvalue(), sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def write_folder(root, texts):
    """texts[:60] in a.jsonl, [60:70] in a/z.jsonl, the rest in b/c.json (a list of records), plus files that are
    not data; "a.jsonl" < "a/z.jsonl" as strings (datasets' order), not as paths."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n\n" for i, t in enumerate(texts[:60])))
    (root / "a" / "z.jsonl").write_text("".join(json.dumps({"text": t, "id": 0}) + "\n" for t in texts[60:70]))
    (root / "b" / "c.json").write_text(json.dumps([{"text": t} for t in texts[70:]]))
    (root / "README.md").write_text("# not data\n")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jsonl").write_text('{"text": "hidden"}\n')
    return root


@pytest.fixture
def hf_config(tmp_path, corpus, tiny_config):
    """A tiny config streaming ``corpus`` from a local folder: make(*overrides)."""
    (tmp_path / "sp.model").write_bytes(corpus[1])
    write_folder(tmp_path / "data", corpus[0])

    def make(*overrides):
        return tiny_config(
            "data.type='hf'",
            f"data.train_folder='{tmp_path / 'data'}'",
            f"data.tokenizer_path='{tmp_path / 'sp.model'}'",
            "data.seq_len=16",
            *overrides,
        )

    return make


class IntTokenizer:
    """Texts of integers -> those ids (InternEvo's docstring examples); no BOS/EOS, no truncation."""

    path, vocab_size = "ints", 100

    def encode(self, texts):
        return [np.array([int(w) for w in t.split()], np.int64) for t in texts]


def int_source(tmp_path, tiny_config, samples, *overrides, dp=1):
    (tmp_path / "ints").mkdir()
    (tmp_path / "ints" / "x.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in samples))
    cfg = tiny_config("data.seq_len=5", "data.micro_bsz=2", "data.micro_num=1", *overrides)
    corpus = text.LocalCorpus(tmp_path / "ints", None, "text")
    return hf.StreamSource(corpus, IntTokenizer(), cfg.data, dp, range(dp))


def packs(source, n, rank=0):
    stream = hf.RankStream(source, rank, (0, 0, 0))
    return [stream.next_pack() for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------------
# Reading local files
# ------------------------------------------------------------------------------------------------------------------


def test_local_folder_order_formats_and_rank_slices(tmp_path, corpus):
    texts = corpus[0]
    c = text.LocalCorpus(write_folder(tmp_path / "d", texts), None, "text")
    assert [p.name for p in c.files] == ["a.jsonl", "z.jsonl", "c.json"]  # README.md, hidden files skipped
    assert [t for _, t in c.examples(0, 1, 0)] == texts  # blank lines are no examples
    # rank r of dp reads examples r::dp; its indices count its own slice; start skips into that slice
    slices = [list(c.examples(r, 3, 0)) for r in range(3)]
    assert [[t for _, t in s] for s in slices] == [texts[r::3] for r in range(3)]
    assert all([i for i, _ in s] == list(range(len(s))) for s in slices)
    assert list(c.examples(1, 3, 30)) == slices[1][30:]
    # a single file, JSON lines inside a .json, gzip, plain-string records
    (tmp_path / "one.json").write_text("\n".join(json.dumps({"text": t}) for t in texts[:5]))
    assert [t for _, t in text.LocalCorpus(tmp_path / "one.json", None, "text").examples(0, 1, 0)] == texts[:5]
    (tmp_path / "z").mkdir()
    with gzip.open(tmp_path / "z" / "x.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(t) + "\n" for t in texts[:4]))
    assert [t for _, t in text.LocalCorpus(tmp_path / "z", None, "body").examples(0, 1, 0)] == texts[:4]
    # symlinked folders are read (once), as for .bin data
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "z").symlink_to(tmp_path / "z")
    (tmp_path / "z" / "loop").symlink_to(tmp_path / "links")
    assert [t for _, t in text.LocalCorpus(tmp_path / "links", None, "body").examples(0, 1, 0)] == texts[:4]


def test_split_names_and_subset_name(tmp_path):
    root = tmp_path / "d"
    (root / "wiki").mkdir(parents=True)
    (root / "wiki" / "train-00000.jsonl").write_text('{"text": "a"}\n')
    (root / "wiki" / "test.jsonl").write_text('{"text": "b"}\n')
    (root / "wiki" / "validation_1.jsonl").write_text('{"text": "c"}\n')
    (root / "code").mkdir()
    (root / "code" / "x.jsonl").write_text('{"text": "d"}\n')
    # datasets' split="train": only files or folders named as the train split
    assert [t for _, t in text.LocalCorpus(root, None, "text").examples(0, 1, 0)] == ["a"]
    assert [t for _, t in text.LocalCorpus(root, "code", "text").examples(0, 1, 0)] == ["d"]  # data_dir=subset_name
    (root / "wiki" / "training").mkdir()  # a split folder wins over split file names
    (root / "wiki" / "training" / "x.jsonl").write_text('{"text": "e"}\n')
    assert [t for _, t in text.LocalCorpus(root, "wiki", "text").examples(0, 1, 0)] == ["e"]
    (root / "wiki" / "training" / "x.jsonl").unlink()
    (root / "wiki" / "training").rmdir()
    (root / "wiki" / "train-00000.jsonl").unlink()
    with pytest.raises(DataError, match=r"wiki: names mark splits \(test.jsonl, validation_1.jsonl, ...\).*train"):
        text.LocalCorpus(root / "wiki", None, "text")
    with pytest.raises(DataError, match="no subfolder 'nope' \\(data.subset_name\\)"):
        text.LocalCorpus(root, "nope", "text")


def test_parquet_and_arrow_match_jsonl(tmp_path, corpus):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = corpus[0][:50]
    table = pa.table({"id": list(range(50)), "content": texts})
    (tmp_path / "p").mkdir()
    pq.write_table(table.slice(0, 30), tmp_path / "p" / "0.parquet", row_group_size=7)
    with pa.ipc.new_stream(tmp_path / "p" / "1.arrow", table.schema) as w:  # what datasets' save_to_disk writes
        w.write_table(table.slice(30))
    assert [t for _, t in text.LocalCorpus(tmp_path / "p", None, "content").examples(0, 1, 0)] == texts
    with pytest.raises(DataError, match=r"0.parquet: no column 'text' \(columns: \['id', 'content'\]\).*content_name"):
        list(text.LocalCorpus(tmp_path / "p", None, "text").examples(0, 1, 0))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match="x.parquet: reading .parquet files needs pyarrow: pip install pyarrow"):
        list(text.LocalCorpus(tmp_path, None, "text").examples(0, 1, 0))


def test_matches_datasets_load_dataset_on_a_local_folder(tmp_path, corpus):
    """Our reader against the real thing, where ``datasets`` is installed (it is not a CI dependency)."""
    datasets = pytest.importorskip("datasets")
    from datasets.distributed import split_dataset_by_node

    root = write_folder(tmp_path / "d", corpus[0])
    (root / "b" / "c.json").rename(root / "b" / "c.jsonl")  # datasets reads one format per folder
    (root / "b" / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[0][70:]))
    ds = datasets.load_dataset(str(root), split="train", streaming=True)
    ours = text.LocalCorpus(root, None, "text")
    assert [t for _, t in ours.examples(0, 1, 0)] == [r["text"] for r in ds]
    for rank in range(2, 4):  # 3 files: datasets splits 4 ranks by example, as we always do
        expected = [r["text"] for r in split_dataset_by_node(ds, rank=rank, world_size=4)]
        assert [t for _, t in ours.examples(rank, 4, 0)] == expected
    # split names and data_dir=subset_name
    (root / "wiki" / "train").mkdir(parents=True)
    for name, lo in (("train/b.jsonl", 0), ("train_0.jsonl", 5), ("test.jsonl", 10), ("dev-1.jsonl", 15)):
        (root / "wiki" / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[0][lo : lo + 5]))
    ds = datasets.load_dataset(str(root), data_dir="wiki", split="train", streaming=True)
    assert [t for _, t in text.LocalCorpus(root, "wiki", "text").examples(0, 1, 0)] == [r["text"] for r in ds]


# ------------------------------------------------------------------------------------------------------------------
# Packing: InternEvo's docstring examples by hand, then its algorithms on real text
# ------------------------------------------------------------------------------------------------------------------

DOC_SAMPLES = ["1 2", "3 4", "5 6 7", "8 9 0 11 12", "13 14"]  # InternEvo's example (with a 0 token in the 4th)


def test_pad_mode_by_hand(tmp_path, tiny_config):
    p1, p2, p3 = packs(int_source(tmp_path, tiny_config, DOC_SAMPLES), 3)
    # [1, 2, 3, 4, 5, 6, 7, 0, 0, 0], cu_seqlens [0, 2, 4, 7, 10]: the pad is a segment of its own
    assert p1["tokens"].tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    assert p1["segment_ids"].tolist() == [1, 1, 2, 2, 3, 3, 3, 4, 4, 4]
    assert p1["positions"].tolist() == [0, 1, 0, 1, 0, 1, 2, 0, 1, 2]
    assert p1["labels"].tolist() == [2, -100, 4, -100, 6, 7, -100, -100, -100, -100]
    # [8, 9, 0, 11, 12, 13, 14, 0, 0, 0], cu_seqlens [0, 5, 7, 10]; label id 0 is ignored (w if w > 0)
    assert p2["tokens"].tolist() == [8, 9, 0, 11, 12, 13, 14, 0, 0, 0]
    assert p2["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 3, 3, 3]
    assert p2["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2]
    assert p2["labels"].tolist() == [9, -100, 11, 12, -100, 14, -100, -100, -100, -100]
    assert all((p["type_ids"] == 0).all() for p in (p1, p2))
    for k in p1:  # the stream ended: the last pack was padded and the next epoch starts over
        np.testing.assert_array_equal(p3[k], p1[k])


def test_pack_sample_into_one_by_hand(tmp_path, tiny_config):
    p1, p2, p3 = packs(int_source(tmp_path, tiny_config, DOC_SAMPLES, "data.pack_sample_into_one=True"), 3)
    # [1..10] then [11, 12, 13, 14, 0 ...]: the 4th sample is cut at the pack edge; fixed seq_len windows
    assert p1["tokens"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert p1["labels"].tolist() == [2, -100, 4, -100, 6, 7, -100, 9, -100, -100]  # every fragment ends with -100
    assert p2["tokens"].tolist() == [11, 12, 13, 14, 0, 0, 0, 0, 0, 0]
    assert p2["labels"].tolist() == [12, -100, 14, -100, -100, -100, -100, -100, -100, -100]
    for p in (p1, p2):
        assert p["positions"].tolist() == [0, 1, 2, 3, 4] * 2
        assert p["segment_ids"].tolist() == [1] * 5 + [2] * 5
    np.testing.assert_array_equal(p3["tokens"], p1["tokens"])


def test_unpacked_rows_by_hand(tmp_path, tiny_config):
    p1, p2, p3 = packs(int_source(tmp_path, tiny_config, DOC_SAMPLES, "data.use_packed_dataset=False"), 3)
    assert p1["tokens"].tolist() == [1, 2, 0, 0, 0, 3, 4, 0, 0, 0]
    assert p1["segment_ids"].tolist() == [1, 1, 2, 2, 2, 3, 3, 4, 4, 4]
    assert p1["positions"].tolist() == [0, 1, 0, 1, 2, 0, 1, 0, 1, 2]
    assert p1["labels"].tolist() == [2, -100, -100, -100, -100, 4, -100, -100, -100, -100]
    assert p2["tokens"].tolist() == [5, 6, 7, 0, 0, 8, 9, 0, 11, 12]
    assert p3["tokens"].tolist() == [13, 14, 0, 0, 0, 0, 0, 0, 0, 0]  # the stream ended: a padding row


def internevo_with_pad(samples, seq_len, micro_bsz):
    """``StreamingDatasetPackSampleWithPad.__iter__`` (InternEvo v0.5), as lists."""
    p = seq_len * micro_bsz
    input_ids, cu_seqlens, labels = [], [0], []
    for sample in samples:
        if len(input_ids + sample) > p:
            input_ids = input_ids + [0] * (p - len(input_ids))
            cu_seqlens = cu_seqlens + [p] if cu_seqlens[-1] < p else cu_seqlens
            labels = labels + [-100] * (p - len(labels))
            yield input_ids, cu_seqlens, labels
            input_ids, cu_seqlens = sample, [0, len(sample)]
            labels = [w if w > 0 else -100 for w in sample][1:] + [-100]
        else:
            input_ids = input_ids + sample
            cu_seqlens.append(len(sample) + cu_seqlens[-1])
            labels = labels + [w if w > 0 else -100 for w in sample][1:] + [-100]
    if input_ids:
        input_ids = input_ids + [0] * (p - len(input_ids))
        cu_seqlens = cu_seqlens + [p] if cu_seqlens[-1] < p else cu_seqlens
        yield input_ids, cu_seqlens, labels + [-100] * (p - len(labels))


def internevo_into_one(samples, seq_len, micro_bsz):
    """``StreamingDatasetPackSampleIntoOneWithCut.__iter__`` (InternEvo v0.5), as lists, as its docstring means it.

    InternEvo's code takes the rest of a cut sample after extending the pack (``sample[P - len(input_ids):]`` with
    ``len(input_ids) == P``), so the next pack starts with the whole sample again; its docstring example continues
    with the rest only, which is what we do (and check here).
    """
    p = seq_len * micro_bsz
    windows = [i * seq_len for i in range(micro_bsz + 1)]
    input_ids, labels = [], []
    for sample in samples:
        if len(input_ids + sample) > p:
            cut, rest = sample[: p - len(input_ids)], sample[p - len(input_ids) :]
            if cut:
                input_ids = input_ids + cut
                labels = labels + [w if w > 0 else -100 for w in cut][1:] + [-100]
            yield input_ids, windows, labels
            input_ids, labels = rest, [w if w > 0 else -100 for w in rest][1:] + [-100]
        else:
            input_ids = input_ids + sample
            labels = labels + [w if w > 0 else -100 for w in sample][1:] + [-100]
    if input_ids:
        yield input_ids + [0] * (p - len(input_ids)), windows, labels + [-100] * (p - len(labels))


@pytest.mark.parametrize("mode", ["pad", "into_one"])
@pytest.mark.parametrize("seq_len,micro_bsz,dp", [(16, 2, 2), (8, 3, 3), (32, 1, 1)])
def test_packs_match_internevo_on_tokenized_text(hf_config, corpus, mode, seq_len, micro_bsz, dp):
    texts, _, sp = corpus
    cfg = hf_config(
        f"data.seq_len={seq_len}", f"data.micro_bsz={micro_bsz}", f"data.pack_sample_into_one={mode != 'pad'}"
    )
    source, dataset_types = build_train_loader(cfg.data, dp, vocab_size=cfg.model.vocab_size)
    assert dataset_types == ["en"] and source.mode == mode
    reference = internevo_with_pad if mode == "pad" else internevo_into_one
    for rank in range(dp):
        # the transformers-style tokenizing: BOS + ids + EOS, truncated to seq_len keeping BOS/EOS
        samples = [[1] + sp.encode(t)[: seq_len - 2] + [2] for t in texts[rank::dp]]
        epochs = itertools.chain.from_iterable(reference(samples, seq_len, micro_bsz) for _ in itertools.count())
        stream = hf.RankStream(source, rank, (0, 0, 0))
        for _ in range(3 * len(samples) * seq_len // (seq_len * micro_bsz)):  # about three epochs
            tokens, cu_seqlens, labels = next(epochs)
            got = stream.next_pack()
            assert got["tokens"].tolist() == tokens
            assert got["labels"].tolist() == [w if w > 0 else IGNORE_INDEX for w in labels]
            lengths = np.diff(cu_seqlens)
            assert got["segment_ids"].tolist() == np.repeat(np.arange(1, len(lengths) + 1), lengths).tolist()
            assert got["positions"].tolist() == np.concatenate([np.arange(n) for n in lengths]).tolist()


# ------------------------------------------------------------------------------------------------------------------
# Batches, ranks, resume
# ------------------------------------------------------------------------------------------------------------------


def test_batches_per_rank_and_per_process(hf_config):
    cfg = hf_config()
    source, _ = build_train_loader(cfg.data, 2)
    it = iterate(source, 2)
    items = [next(it) for _ in range(4)]
    assert [x["step"] for x in items] == [0, 1, 2, 3]
    assert items[0]["batch"]["tokens"].shape == (2, 2, 32)  # [micro_num, rows, micro_bsz * seq_len]
    assert set(items[0]["stats"]) == {"num_samples_in_batch", "largest_length", "largest_batch", "smallest_batch"}
    # rank r's micro-batches are its stream's consecutive packs
    expected = [packs(source, 8, rank) for rank in range(2)]
    for rank in range(2):
        for step, m in itertools.product(range(4), range(2)):
            np.testing.assert_array_equal(
                items[step]["batch"]["tokens"][m, rank], expected[rank][2 * step + m]["tokens"]
            )
    # a process feeding only rank 1 (multi-host) gets rank 1's rows and no stats
    only, _ = build_train_loader(cfg.data, 2, rows=range(1, 2))
    first = next(iterate(only, 1))
    assert first["stats"] == {} and first["batch"]["tokens"].shape == (2, 1, 32)
    np.testing.assert_array_equal(first["batch"]["tokens"][:, 0], items[0]["batch"]["tokens"][:, 1])
    # the two ranks read disjoint examples: no text appears in both (each sample is BOS ... EOS)
    seen = [{tuple(s.tolist()) for _, s in source.samples(rank, 0)} for rank in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("mode", ["pad", "into_one", "unpacked"])
def test_resume_is_exact(hf_config, mode):
    flags = {"pad": [], "into_one": ["data.pack_sample_into_one=True"], "unpacked": ["data.use_packed_dataset=False"]}
    cfg = hf_config(*flags[mode])
    source, _ = build_train_loader(cfg.data, 2)
    whole = iterate(source, 1)
    expected = [next(whole) for _ in range(12)]  # past the end of a rank's slice: the epoch wrap is resumed too
    head = iterate(source, 3)
    for _ in range(5):
        next(head)
    state = json.loads(json.dumps(head.get_state()))  # as the checkpoint stores it
    assert state["step"] == 5
    if mode == "into_one":
        assert any(offset for _, _, offset in state["positions"].values())  # resumes inside a cut sample
    fresh_source, _ = build_train_loader(cfg.data, 2)  # a new process
    resumed = iterate(fresh_source, 1, state)
    assert resumed.get_state() == state
    for want in expected[5:]:
        got = next(resumed)
        assert got["step"] == want["step"] and got["stats"] == want["stats"]
        for k in want["batch"]:
            np.testing.assert_array_equal(got["batch"][k], want["batch"][k])
    # without this process's ranks in the state (multi-host), the stream is re-read and skipped: same batches
    del state["positions"]["1"]
    replayed = iterate(fresh_source, 1, state)
    for want in expected[5:8]:
        got = next(replayed)
        np.testing.assert_array_equal(got["batch"]["tokens"], want["batch"]["tokens"])


def test_state_from_another_data_type_is_refused(hf_config):
    source, _ = build_train_loader(hf_config().data, 2)
    with pytest.raises(ConfigError, match="not from a data.type='hf'/'streaming' run"):
        iterate(source, 1, {"next_index": 3})


# ------------------------------------------------------------------------------------------------------------------
# Errors that name the thing, the place and the fix
# ------------------------------------------------------------------------------------------------------------------


def test_config_errors(hf_config, tiny_config):
    with pytest.raises(ConfigError, match="data.type='hf' tokenizes on the fly: set data.tokenizer_path"):
        tiny_config("data.type='hf'", "data.train_folder='x'")
    with pytest.raises(ConfigError, match="data.type='streaming' reads data.train_folder: set it"):
        tiny_config("data.type='streaming'", "data.tokenizer_path='x.model'")
    with pytest.raises(ConfigError, match="data.type='parquet' is unknown"):
        tiny_config("data.type='parquet'")
    assert hf_config("data.type='streaming'").data.type == "streaming"
    with pytest.raises(ConfigError, match="data.rampup_batch_size='1 1 2' is not supported with data.type='hf'"):
        build_train_loader(hf_config("data.rampup_batch_size='1 1 2'").data, 1)


def test_data_errors(hf_config, tmp_path):
    with pytest.raises(DataError, match=r"data.tokenizer_path .*nope.model: no such file or folder; pass a Sentence"):
        build_train_loader(hf_config(f"data.tokenizer_path='{tmp_path / 'nope.model'}'").data, 1)
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(DataError, match=r"bad.model is not a SentencePiece model"):
        build_train_loader(hf_config(f"data.tokenizer_path='{tmp_path / 'bad.model'}'").data, 1)
    with pytest.raises(DataError, match=r"a.jsonl, line 1: no 'body' field \(the record has \['id', 'text'\]\); set "):
        build_train_loader(hf_config("data.content_name='body'").data, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty has no .jsonl, .json, .parquet or .arrow files.*point it at"):
        build_train_loader(hf_config(f"data.train_folder='{tmp_path / 'empty'}'").data, 1)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank \(1 file\) holds no examples \(empty files\?\); add data"):
        build_train_loader(hf_config(f"data.train_folder='{tmp_path / 'blank'}'").data, 1)
    for missing in (f"local:{tmp_path / 'missing'}", str(tmp_path / "missing"), "./data/wiki"):
        with pytest.raises(DataError, match=r"data.train_folder .*missing|wiki: no such file or folder"):
            build_train_loader(hf_config(f"data.train_folder='{missing}'").data, 1)
    with pytest.raises(DataError, match=r"has 60 tokens but model.vocab_size is 50"):
        build_train_loader(hf_config().data, 1, vocab_size=50)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.jsonl").write_text('{"text": "ka"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"x.jsonl, line 2: not a JSON record"):
        list(text.LocalCorpus(tmp_path / "j", None, "text").examples(0, 1, 0))
    (tmp_path / "j" / "x.jsonl").write_text('{"text": "5 6"}\n{"text": ""}\n')  # "" tokenizes to nothing here
    source = hf.StreamSource(
        text.LocalCorpus(tmp_path / "j", None, "text"), IntTokenizer(), hf_config().data, 2, range(2)
    )
    with pytest.raises(DataError, match=r"rank 1 of 2 reads examples 1, 3, ... and none of them holds text"):
        next(iterate(source, 1))


# ------------------------------------------------------------------------------------------------------------------
# The Hugging Face paths, with stand-ins for datasets and transformers (no network here)
# ------------------------------------------------------------------------------------------------------------------


def test_hub_dataset_goes_through_datasets_load_dataset(hf_config, monkeypatch, corpus):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"text": t} for t in corpus[0]]

    def split_dataset_by_node(ds, rank, world_size):
        return ds[rank::world_size]

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    fake.distributed = types.ModuleType("datasets.distributed")
    fake.distributed.split_dataset_by_node = split_dataset_by_node
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setitem(sys.modules, "datasets.distributed", fake.distributed)
    cfg = hf_config("data.train_folder='org/corpus'", "data.subset_name='en'")
    source, _ = build_train_loader(cfg.data, 2)
    assert calls[0] == (("org/corpus",), dict(data_dir="en", split="train", streaming=True))
    assert [t for _, t in source.corpus.examples(1, 2, 0)] == corpus[0][1::2]
    assert next(iterate(source, 1))["batch"]["tokens"].shape == (2, 2, 32)

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"'org/corpus' is not a local file or folder.*pip install datasets"):
        build_train_loader(cfg.data, 2)


def test_folder_with_only_tokenizer_model_is_sentencepiece(tmp_path, corpus):
    # A model folder holding only tokenizer.model (InternEvo's, Meta's) has nothing AutoTokenizer can read.
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(corpus[1])
    (tmp_path / "tok" / "config.json").write_text("{}")
    by_folder = text.Tokenizer(str(tmp_path / "tok"), seq_len=16)
    by_file = text.Tokenizer(str(tmp_path / "tok" / "tokenizer.model"), seq_len=16)
    assert by_folder.vocab_size == by_file.vocab_size == 60
    assert [x.tolist() for x in by_folder.encode(corpus[0][:3])] == [x.tolist() for x in by_file.encode(corpus[0][:3])]


def test_tokenizer_folder_goes_through_auto_tokenizer(tmp_path, monkeypatch):
    calls = []

    class FakeAutoTokenizer:
        model_max_length = 1_000_000

        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append((path, kwargs))
            return cls()

        def __len__(self):
            return 90

        def __call__(self, texts, truncation):
            assert truncation
            return {"input_ids": [[1, *range(3, 3 + len(t))][: self.model_max_length] for t in texts]}

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = FakeAutoTokenizer
    monkeypatch.setitem(sys.modules, "transformers", fake)
    (tmp_path / "tok").mkdir()
    tok = text.Tokenizer(f"local:{tmp_path / 'tok'}", seq_len=4)
    assert calls == [(str(tmp_path / "tok"), {"trust_remote_code": True})]
    assert tok.vocab_size == 90 and tok._hf.model_max_length == 4
    assert [x.tolist() for x in tok.encode(["ab", "abcdef", ""])] == [[1, 3, 4], [1, 3, 4, 5], [1]]
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DataError, match=r"tok: a tokenizer folder or Hub name needs transformers; pip install"):
        text.Tokenizer(str(tmp_path / "tok"), seq_len=4)


# ------------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------------


def test_trainer_runs_on_a_local_text_folder(hf_config, tmp_path):
    from internevo_jax import Trainer

    # one layer and one micro-batch: the compile is most of this test's time
    cfg = hf_config("data.total_steps=3", "data.micro_num=1", "model.num_layers=1", f"run_folder='{tmp_path}/run'")
    trainer = Trainer(cfg)
    assert trainer.dataset_types == ["en"]
    summary = trainer.fit()
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["tokens/en"] > 0 for r in rows)
