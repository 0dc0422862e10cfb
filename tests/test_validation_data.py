"""InternEvo's validation data (D-13): set discovery, the min_length quirk, batch sizes, rank order, collate, errors."""

import os

import ml_collections
import numpy as np
import pytest

from internevo_jax.data.dummy import DummyDataset
from internevo_jax.data.packing import IGNORE_INDEX
from internevo_jax.data.tokenized import DataError
from internevo_jax.data.validation import (
    VALID_MIN_LENGTH,
    build_valid_sets,
    collate,
    rank_samples,
    valid_batch_rows,
)

from .test_tokenized import write_bin


def data_cfg(folder, seq_len=64, micro_bsz=2, valid_micro_num=2):
    return ml_collections.ConfigDict(
        dict(valid_folder=None if folder is None else str(folder), seq_len=seq_len, micro_bsz=micro_bsz,
             valid_micro_num=valid_micro_num)
    )  # fmt: skip


def tagged(first, n, length=VALID_MIN_LENGTH):
    """n samples whose first token is first, first + 1, ...: the sample's identity survives the collate."""
    return [[first + k] + [1] * (length - 1) for k in range(n)]


def reference_collate(sample, seq_len):
    """jsonl_ds_collate_fn for one sample, written out as InternEvo's list code."""
    x = list(sample)[:seq_len]
    tokens = [abs(w) for w in x]
    labels = [w if w > 0 else -100 for w in x]
    labels = labels[1:] + [-100]
    pad = seq_len - len(tokens)
    return tokens + [0] * pad, labels + [-100] * pad


# ------------------------------------------------------------------------------------------------------------------
# Sets
# ------------------------------------------------------------------------------------------------------------------


def test_every_folder_with_bin_files_is_one_set_named_after_it(tmp_path):
    root = tmp_path / "valid"
    write_bin(root / "en" / "b.bin", tagged(300, 2))
    write_bin(root / "en" / "a.bin", tagged(200, 3))  # sorted: a.bin's samples come first
    write_bin(root / "cn" / "x.bin", tagged(400, 2))
    write_bin(root / "cn" / "sub" / "y.bin", tagged(500, 4))  # its own set, not part of cn
    write_bin(root / "top.bin", tagged(600, 1))  # a .bin in the root makes a set named after the root
    (root / "empty").mkdir()
    (root / "en" / "notes.txt").write_text("not data")
    sets = build_valid_sets(data_cfg(root), dp_size=1, min_length=0)
    # os.walk order with sorted dirs: the root, then cn, cn/sub, en (pre-order).
    assert [s.name for s in sets] == ["valid", "cn", "sub", "en"]
    firsts = {s.name: [int(s.samples.tokens(i)[0]) for i in range(s.num_samples)] for s in sets}
    assert firsts == {"valid": [600], "cn": [400, 401], "sub": [500, 501, 502, 503], "en": [200, 201, 202, 300, 301]}
    # A trailing slash names the root set the same (InternEvo's basename would be "").
    assert [s.name for s in build_valid_sets(data_cfg(f"{root}/"), 1, min_length=0)][0] == "valid"


def test_two_folders_with_one_name_fail(tmp_path):
    write_bin(tmp_path / "a" / "en" / "v.bin", tagged(1, 2))
    write_bin(tmp_path / "b" / "en" / "v.bin", tagged(1, 2))
    with pytest.raises(DataError, match=r"validation folders .*a/en and .*b/en are both named 'en'"):
        build_valid_sets(data_cfg(tmp_path), 1)


def test_min_length_50_applies_to_validation_by_default(tmp_path):
    write_bin(tmp_path / "en" / "v.bin", [[7] * 49, [8] * 50, [9] * 120])
    (s,) = build_valid_sets(data_cfg(tmp_path, micro_bsz=1), dp_size=1)
    assert VALID_MIN_LENGTH == 50 and s.num_samples == 2 and s.num_dropped == 1
    assert [int(s.samples.tokens(i)[0]) for i in range(2)] == [8, 9]
    (s,) = build_valid_sets(data_cfg(tmp_path, micro_bsz=1), dp_size=1, min_length=0)  # the knob is real
    assert s.num_samples == 3 and s.num_dropped == 0


def test_dummy_set_without_valid_folder():
    (s,) = build_valid_sets(data_cfg(None, seq_len=16), dp_size=2)
    assert (s.name, s.num_samples, s.batch_rows, s.num_batches) == ("val", 1000, 4, 500 // 4)
    tokens, _ = collate([DummyDataset(1000, 16).tokens(3)], 16)  # rank 1's second sample
    np.testing.assert_array_equal(s.batch(0)["tokens"][0, 1, 16:], tokens[0])


# ------------------------------------------------------------------------------------------------------------------
# Batch sizes and rank order
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, valid_micro_num, micro_bsz, dp, rows",
    [
        (100, 4, 2, 2, 8),  # valid_micro_num * micro_bsz is the cap
        (23, 4, 2, 3, 6),  # N // dp = 7, rounded down to a multiple of micro_bsz
        (9, 4, 3, 3, 3),  # N // dp = 3 = micro_bsz
        (5, 4, 2, 3, 0),  # N // dp = 1 < micro_bsz: skipped
    ],
)
def test_batch_rows_formula(tmp_path, n, valid_micro_num, micro_bsz, dp, rows):
    assert valid_batch_rows(n, valid_micro_num, micro_bsz, dp) == rows
    write_bin(tmp_path / "en" / "v.bin", tagged(1, n))
    (s,) = build_valid_sets(data_cfg(tmp_path, micro_bsz=micro_bsz, valid_micro_num=valid_micro_num), dp)
    assert s.batch_rows == rows
    if rows:
        assert s.skip_reason is None and s.num_batches == (n // dp) // rows and s.micro_num == rows // micro_bsz
    else:
        assert s.num_batches == 0 and s.skip_reason.startswith("skip validate en: 5 samples")
        with pytest.raises(IndexError):
            s.batch(0)


def test_ranks_take_strided_samples_and_drop_the_tail():
    # DataParallelSampler(shuffle=False, drop_last=True) over 11 samples and 3 ranks: 9 used, 2 dropped.
    assert [rank_samples(11, 3, r).tolist() for r in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert [rank_samples(12, 3, r).tolist() for r in range(3)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert rank_samples(2, 3, 0).tolist() == []


def test_batches_follow_rank_order_and_micro_batch_layout(tmp_path):
    write_bin(tmp_path / "en" / "v.bin", tagged(100, 21))
    # dp 2: 10 samples per rank (sample 20 dropped by the sampler); batch_rows min(2 * 2, 10) = 4; 2 batches (each
    # rank's last 2 samples dropped by the loader's drop_last); rank r's list is r::2.
    (s,) = build_valid_sets(data_cfg(tmp_path, seq_len=64, micro_bsz=2, valid_micro_num=2), dp_size=2)
    assert (s.batch_rows, s.micro_num, s.num_batches) == (4, 2, 2)
    seen = []
    for i in range(s.num_batches):
        b = s.batch(i)
        assert all(v.shape == (2, 2, 128) and v.dtype == np.int32 for v in b.values())
        first = b["tokens"][:, :, ::64] - 100  # [micro, rank, slot]: the sample in each seq_len slice
        for r in range(2):
            mine = rank_samples(21, 2, r)[i * 4 : (i + 1) * 4]
            np.testing.assert_array_equal(first[:, r].ravel(), mine)  # micro m = the rank's rows 2m, 2m + 1
        seen += first.ravel().tolist()
        np.testing.assert_array_equal(s.batch(i, range(1, 2))["tokens"], b["tokens"][:, 1:2])  # rows picks ranks
    assert sorted(seen) == list(range(16))
    with pytest.raises(IndexError):
        s.batch(2)


# ------------------------------------------------------------------------------------------------------------------
# Collate
# ------------------------------------------------------------------------------------------------------------------


def test_collate_matches_jsonl_ds_collate_fn():
    seq_len = 8
    samples = [
        [5, -6, 7, 0, 8],  # negative and 0 targets -> -100; padded
        list(range(1, 11)),  # truncated to 8: the 9 after the cut is not a target
        [-3, 4, -5, 6, -7, 8, -9, 10],  # exactly seq_len
        [9],
    ]
    tokens, labels = collate([np.array(s) for s in samples], seq_len)
    assert tokens[0].tolist() == [5, 6, 7, 0, 8, 0, 0, 0]  # by hand
    assert labels[0].tolist() == [-100, 7, -100, 8, -100, -100, -100, -100]
    assert labels[1].tolist() == [2, 3, 4, 5, 6, 7, 8, -100]
    for row, s in enumerate(samples):
        ref_tokens, ref_labels = reference_collate(s, seq_len)
        assert tokens[row].tolist() == ref_tokens and labels[row].tolist() == ref_labels


def test_batch_fields_per_sequence_slice(tmp_path):
    rng = np.random.RandomState(0)
    samples = [rng.randint(-50, 50, size=n) for n in (3, 9, 6, 12)]  # seq_len 8: two are truncated
    write_bin(tmp_path / "en" / "v.bin", samples)
    (s,) = build_valid_sets(data_cfg(tmp_path, seq_len=8, micro_bsz=2, valid_micro_num=2), 1, min_length=0)
    b = s.batch(0)
    assert b["tokens"].shape == (2, 1, 16)
    for k, sample in enumerate(samples):  # one rank: sample k is micro k // 2, slot k % 2
        m, j = divmod(k, 2)
        cut = slice(j * 8, (j + 1) * 8)
        ref_tokens, ref_labels = reference_collate(sample.tolist(), 8)
        n = min(len(sample), 8)
        assert b["tokens"][m, 0, cut].tolist() == ref_tokens
        assert b["labels"][m, 0, cut].tolist() == ref_labels
        assert b["segment_ids"][m, 0, cut].tolist() == [j + 1] * n + [0] * (8 - n)  # padding: segment 0
        assert b["positions"][m, 0, cut].tolist() == list(range(8))
    assert not b["type_ids"].any()
    assert (b["labels"][b["segment_ids"] == 0] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_missing_folder_and_folder_without_bin_files(tmp_path):
    with pytest.raises(DataError, match=rf"data.valid_folder {tmp_path}/nope does not exist.*set it to None"):
        build_valid_sets(data_cfg(tmp_path / "nope"), 1)
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "v.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=rf"data.valid_folder {tmp_path} has no .bin files.*{tmp_path}/en/valid.bin"):
        build_valid_sets(data_cfg(tmp_path), 1)


def test_bad_files_fail_with_the_file(tmp_path):
    write_bin(tmp_path / "en" / "v.bin", tagged(1, 4))
    os.remove(tmp_path / "en" / "v.bin.meta")
    with pytest.raises(DataError, match=r"en/v\.bin: no index v\.bin\.meta"):
        build_valid_sets(data_cfg(tmp_path), 1)
    path = tmp_path / "cn" / "v.bin"
    write_bin(path, tagged(1, 4))
    os.remove(tmp_path / "en" / "v.bin")
    path.write_bytes(path.read_bytes().replace(b'{"tokens": [2,', b'{"tokens": [x,'))  # same length, bad JSON
    (s,) = build_valid_sets(data_cfg(tmp_path, micro_bsz=1, valid_micro_num=1), 1)
    s.batch(0)
    with pytest.raises(DataError, match=r"cn/v\.bin, line 2 \(byte offset \d+\): malformed line"):
        s.batch(1)


def test_real_config_keys_and_vocab_bound(tmp_path, tiny_config):
    write_bin(tmp_path / "en" / "v.bin", [[5] * 60, [300] * 60])  # tiny's vocab is 256
    cfg = tiny_config(f"data.valid_folder={tmp_path}", "data.micro_num=1")  # valid_micro_num follows micro_num
    (s,) = build_valid_sets(cfg.data, dp_size=1, vocab_size=cfg.model.vocab_size)
    assert (s.batch_rows, s.micro_num, s.num_batches) == (2, 1, 1)  # micro_bsz 2
    with pytest.raises(DataError, match=r"v\.bin, line 2 .*token id 300 is outside \[-255, 256\)"):
        s.batch(0)
