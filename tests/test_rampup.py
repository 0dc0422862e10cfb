"""data.rampup_batch_size (D-11): the batch order against InternEvo's ``StaticBatchSampler`` over several epochs,
short batches included, and resumed runs equal to uninterrupted ones at every step."""

import numpy as np
import pytest

from internevo_jax.config import ConfigError
from internevo_jax.data.loader import BatchSchedule, build_train_loader, iterate


class ReferenceSampler:
    """The index arithmetic of InternEvo's ``StaticBatchSampler`` (internlm/data/tokenized/batch_sampler.py) for
    one data-parallel rank on an uninterrupted run, written out here from its rules rather than from our loader:

    - ``get_indices`` (at construction and whenever an epoch's list has been read to its end) shuffles
      ``arange(N)`` with one continuing ``RandomState(seed)`` and keeps the first ``n`` entries, where with
      ``ramp_steps = (B - start) // incr`` (floor): while ``batch_count < ramp_steps * every`` the ramp's
      ``R = sum((i * incr + start) * every for i < ramp_steps)`` samples per rank are set aside,
      ``n = (N - R*dp) // (B*dp) * B*dp + R*dp``; otherwise ``n = N // (B*dp) * B*dp``;
    - rank r reads ``indices[r::dp]`` front to back; each batch takes
      ``min((batch_count // every) * incr + start, B)`` entries, or what is left of the list;
    - no rampup means start = incr = B, every = 1.
    """

    def __init__(self, num_samples, batch_size, rampup, seed, rank, world):
        self.n, self.b, self.rank, self.world = num_samples, batch_size, rank, world
        self.start, self.incr, self.every = map(int, rampup.split()) if rampup else (batch_size, batch_size, 1)
        self.rng = np.random.RandomState(seed)
        self.batch_count = 0
        self.epochs = 0

    def _indices(self):
        indices = np.arange(self.n)
        self.rng.shuffle(indices)
        ramp_steps = (self.b - self.start) // self.incr
        if self.batch_count < ramp_steps * self.every:
            reserved = sum((i * self.incr + self.start) * self.every for i in range(ramp_steps))
            keep = (self.n - reserved * self.world) // (self.b * self.world) * self.b * self.world
            keep += reserved * self.world
        else:
            keep = self.n // (self.b * self.world) * self.b * self.world
        self.epochs += 1
        return indices[:keep]

    def __iter__(self):
        while True:
            mine = self._indices()[self.rank :: self.world]
            consumed = 0
            while consumed < len(mine):
                size = min((self.batch_count // self.every) * self.incr + self.start, self.b)
                batch = mine[consumed : consumed + size]
                consumed += len(batch)
                self.batch_count += 1
                yield batch


CASES = [
    (12, 4, 1, "2 1 1"),  # the issue's example: the second epoch holds all 12 packs, not the first epoch's 9
    (10, 4, 1, "1 2 3"),  # incr does not divide micro_num - start: short batches, and a ramp across an epoch wrap
    (200, 4, 2, "1 2 1"),
    (50, 8, 3, "3 2 2"),
    (40, 4, 2, "1 1 2"),
    (8, 4, 1, "1 1 1"),  # the first epoch is the set-aside ramp only
    (30, 3, 2, "1 1 4"),
    (50, 2, 3, ""),  # no rampup
    (37, 4, 2, "4 1 1"),  # a rampup that starts at micro_num
]


@pytest.mark.parametrize("num_packs, micro_num, dp, rampup", CASES)
def test_batches_match_internevo_static_batch_sampler(num_packs, micro_num, dp, rampup):
    schedule = BatchSchedule(num_packs, micro_num, dp, seed=11, rampup=rampup)
    refs = [iter(ReferenceSampler(num_packs, micro_num, rampup, 11, r, dp)) for r in range(dp)]
    counter = ReferenceSampler(num_packs, micro_num, rampup, 11, 0, dp)
    steps = 0
    for _ in counter:  # four whole epochs and the start of a fifth
        if counter.epochs == 5:
            break
        steps += 1
    assert steps >= 4 * schedule.steps_per_epoch
    expected = [[next(ref) for _ in range(steps + 1)] for ref in refs]
    for step in range(steps + 1):
        got = schedule.packs(step)
        for r in range(dp):
            np.testing.assert_array_equal(got[:, r], expected[r][step], err_msg=f"step {step} rank {r}")


def test_the_issue_example_step_by_step():
    # 12 packs, micro_num 4, rampup "2 1 1": the first epoch sets 2 + 3 aside and keeps 5 + 4 = 9 packs (steps
    # 0-2); every later epoch keeps all 12 (steps 3-5, 6-8, ...). Cutting them to 9 changes every batch from step 5.
    schedule = BatchSchedule(12, 4, 1, seed=0, rampup="2 1 1")
    assert [len(schedule.packs(s)) for s in range(9)] == [2, 3, 4] + [4] * 6
    rng = np.random.RandomState(0)
    first, second, third = (rng.permutation(12) for _ in range(3))
    np.testing.assert_array_equal(np.concatenate([schedule.packs(s)[:, 0] for s in range(3)]), first[:9])
    np.testing.assert_array_equal(np.concatenate([schedule.packs(s)[:, 0] for s in range(3, 6)]), second)
    np.testing.assert_array_equal(schedule.packs(6)[:, 0], third[:4])


def test_short_batches_where_internevo_has_them():
    # micro_num 4, "1 2 3": InternEvo sets aside floor((4 - 1) / 2) = 1 increment (3 steps of 1), so the first
    # epoch (3 + (10 - 3) // 4 * 4 = 7 packs) ends on a short step; the ramp's 3s go on into the second epoch
    # (8 packs), which ends short too; from the third epoch on every step is full.
    schedule = BatchSchedule(10, 4, 1, seed=0, rampup="1 2 3")
    sizes = [len(schedule.packs(s)) for s in range(12)]
    assert sizes == [1, 1, 1, 3, 1, 3, 4, 1, 4, 4, 4, 4]
    assert [schedule.micro_num_at(s) for s in range(8)] == [1, 1, 1, 3, 3, 3, 4, 4]


@pytest.mark.parametrize(
    "spec, micro_num, sizes",
    [
        ("1 1 4", 4, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]),  # InternEvo's own test cases (D-11)
        ("2 2 2", 8, [2, 2, 4, 4, 6, 6, 8, 8]),
        ("1 2 1", 4, [1, 3, 4, 4]),
    ],
)
def test_rampup_batch_sizes(spec, micro_num, sizes):
    schedule = BatchSchedule(200, micro_num, 2, seed=3, rampup=spec)
    assert [schedule.micro_num_at(s) for s in range(len(sizes))] == sizes
    assert [len(schedule.packs(s)) for s in range(len(sizes))] == sizes


@pytest.mark.parametrize("num_packs, micro_num, dp, rampup", CASES)
def test_a_fresh_schedule_reads_what_an_uninterrupted_one_reads(num_packs, micro_num, dp, rampup):
    """Resuming at any step: a new schedule (nothing drawn yet) asked from step k on equals the one that ran."""
    ran = BatchSchedule(num_packs, micro_num, dp, seed=5, rampup=rampup)
    steps = ran.regular_start + 3 * ran.steps_per_epoch + 2
    expected = [ran.packs(s) for s in range(steps)]
    for k in sorted({1, 2, ran.regular_start - 1, ran.regular_start, steps // 2, steps - 1} - {-1}):
        resumed = BatchSchedule(num_packs, micro_num, dp, seed=5, rampup=rampup)
        for s in range(k, steps):
            np.testing.assert_array_equal(resumed.packs(s), expected[s], err_msg=f"resumed at {k}, step {s}")
    # Steps read out of order (grain's threads) give the same batches.
    shuffled = BatchSchedule(num_packs, micro_num, dp, seed=5, rampup=rampup)
    for s in np.random.RandomState(0).permutation(steps):
        np.testing.assert_array_equal(shuffled.packs(int(s)), expected[s])


def test_loader_with_rampup_resumes_exactly_across_epochs(tiny_config):
    cfg = tiny_config("data.total_steps=30", "data.num_dummy_samples=40", "data.rampup_batch_size='1 1 3'")
    source, _ = build_train_loader(cfg.data, dp_size=2)
    assert 30 > source.schedule.regular_start + 2 * source.schedule.steps_per_epoch  # several epoch wraps
    full = list(iterate(source, 2))
    assert [b["batch"]["tokens"].shape[0] for b in full[:4]] == [1, 1, 1, 2]
    for k in (2, 5, 13, 22):
        it = iterate(source, 2)
        for _ in range(k):
            next(it)
        state = it.get_state()
        fresh, _ = build_train_loader(cfg.data, dp_size=2)
        resumed = iterate(fresh, 1, state)
        for expected in full[k:]:
            got = next(resumed)
            assert got["step"] == expected["step"]
            for f, v in expected["batch"].items():
                np.testing.assert_array_equal(got["batch"][f], v, err_msg=f"resumed at {k}, step {got['step']}")


def test_too_many_rampup_packs_is_a_clear_error():
    # "1 1 1" with micro_num 4 sets 1 + 2 + 3 = 6 packs per rank aside: 12 with dp 2, more than 10.
    with pytest.raises(ConfigError, match="rampup's first 3 steps 12"):
        BatchSchedule(10, 4, 2, seed=0, rampup="1 1 1")


def test_rampup_spec_errors():
    for spec in ("1 1", "0 1 1", "a b c", "9 1 1"):
        with pytest.raises(ConfigError, match="rampup_batch_size"):
            BatchSchedule(100, 8, 1, seed=0, rampup=spec)
