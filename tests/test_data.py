"""InternEvo's dummy dataset (D-01), packing (D-05, D-08) and batch order (D-10, D-14)."""

import numpy as np
import pytest

from internevo_jax.config import ConfigError
from internevo_jax.data.dummy import DummyDataset
from internevo_jax.data.loader import BatchSchedule, batch_stats, build_train_loader, iterate
from internevo_jax.data.packing import IGNORE_INDEX, PackedDataset


def test_dummy_samples_follow_internevo():
    ds = DummyDataset(50, max_len=64)
    rng = np.random.RandomState(1999)
    n, r = rng.randint(1, 30, size=50), rng.randint(10, 200, size=50)  # all n first, then all r
    for i in (0, 7, 49):
        expected = ([n[i], r[i]] + list(range(n[i])) * r[i])[:64]
        assert ds.tokens(i).tolist() == expected
        assert ds.lengths[i] == len(expected)


class ListSamples:
    def __init__(self, samples):
        self.data = [np.asarray(s) for s in samples]
        self.lengths = np.array([len(s) for s in samples])

    def __len__(self):
        return len(self.data)

    def tokens(self, i):
        return self.data[i]

    def type_id(self, i):
        return i % 3


def test_packing_rules():
    # Sample lengths 5, 9, 3, 7 (24 tokens); seq_len 4, micro_bsz 2 -> packs of 8; 3 packs.
    samples = [np.arange(1, 6), np.arange(10, 19), np.arange(30, 33), -np.arange(40, 47)]
    packs = PackedDataset(ListSamples(samples), seq_len=4, micro_bsz=2)
    assert len(packs) == 3
    stream = np.concatenate([samples[i] for i in packs.order])
    ends = np.cumsum([len(samples[i]) for i in packs.order])
    for p in range(3):
        item = packs[p]
        lo = p * 8
        np.testing.assert_array_equal(item["tokens"], np.abs(stream[lo : lo + 8]))
        for j in range(8):
            t = lo + j
            raw = IGNORE_INDEX if t + 1 in ends else stream[t + 1]  # crosses the pack edge unless a sample ends
            assert item["labels"][j] == (raw if raw > 0 else IGNORE_INDEX), (p, j)
        # segments: fragment pieces of <= seq_len; positions restart per piece
        for seg in np.unique(item["segment_ids"]):
            where = np.flatnonzero(item["segment_ids"] == seg)
            assert len(where) <= 4 and np.all(np.diff(where) == 1)
            np.testing.assert_array_equal(item["positions"][where], np.arange(len(where)))
            # a piece never spans two samples
            assert len(np.unique(np.searchsorted(ends, lo + where, side="right"))) == 1


def test_long_sample_is_cut_into_seq_len_pieces():
    packs = PackedDataset(ListSamples([np.arange(1, 17)]), seq_len=4, micro_bsz=4)
    item = packs[0]
    np.testing.assert_array_equal(item["segment_ids"], np.repeat([1, 2, 3, 4], 4))
    np.testing.assert_array_equal(item["positions"], np.tile(np.arange(4), 4))
    # the target across a piece boundary is still trained (D-05): label of token 4 is 5
    assert item["labels"][3] == 5 and item["labels"][-1] == IGNORE_INDEX


def test_schedule_is_internevo_static_batch_sampler():
    sched = BatchSchedule(num_packs=50, micro_num=2, dp_size=3, seed=1024)
    order = np.arange(50)
    rng = np.random.RandomState(1024)
    rng.shuffle(order)
    used = order[:48]
    for step in range(8):
        for rank in range(3):
            expected = used[rank::3][step * 2 : step * 2 + 2]
            np.testing.assert_array_equal(sched.packs(step)[:, rank], expected)
    # epoch wrap: the continuing RNG reshuffles
    rng.shuffle(second := np.arange(50))
    np.testing.assert_array_equal(sched.packs(8)[:, 0], second[:48][0::3][:2])


def test_batch_stats():
    seg = np.array([[1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1]])
    assert batch_stats(seg) == dict(num_samples_in_batch=4, largest_length=6, largest_batch=3, smallest_batch=1)


def test_loader_resumes_exactly(tiny_config):
    cfg = tiny_config("data.total_steps=10")
    source, types = build_train_loader(cfg.data, dp_size=2)
    assert types == ["en", "cn", "code"]
    it = iterate(source, 2)
    first = [next(it) for _ in range(6)]
    assert first[0]["batch"]["tokens"].shape == (2, 2, 64)  # [micro_num, rows, micro_bsz * seq_len]
    state = iterate(source, 2)
    for _ in range(3):
        next(state)
    resumed = iterate(source, 1, state.get_state())
    for expected in first[3:]:
        got = next(resumed)
        assert got["step"] == expected["step"]
        for k, v in expected["batch"].items():
            np.testing.assert_array_equal(got["batch"][k], v)


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ConfigError, match="packs but one step needs"):
        BatchSchedule(num_packs=3, micro_num=2, dp_size=2, seed=0)


def test_threaded_loader_crosses_epochs_deterministically(tiny_config):
    cfg = tiny_config("data.total_steps=40", "data.num_dummy_samples=60")
    threaded, _ = build_train_loader(cfg.data, dp_size=1)
    sequential, _ = build_train_loader(cfg.data, dp_size=1)
    assert 40 > 2 * threaded.schedule.steps_per_epoch  # at least two epoch wraps
    it = iterate(threaded, 4)
    for step in range(40):
        np.testing.assert_array_equal(next(it)["batch"]["tokens"], sequential[step]["batch"]["tokens"])
