"""The reporter: InternEvo's log line, metrics.jsonl and TensorBoard; the terminal status line (redrawn below each
log record on a terminal, absent in files and CI)."""

import io
import json
import logging

import numpy as np
import pytest

from internevo_jax.monitoring.reporter import Reporter, StatusLine, wants_status_line


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_status_line_stays_below_the_log(monkeypatch):
    term = FakeTerminal()
    handler = StatusLine(term, logging.Formatter("%(message)s"))
    log = logging.getLogger("test_status_line")
    log.propagate, log.level = False, logging.INFO
    log.addHandler(handler)
    try:
        handler.update("[1/10 10%] loss 5.0")
        log.info("step=0 loss=5.0")
        handler.update("[2/10 20%] loss 4.0")
    finally:
        log.removeHandler(handler)
        handler.close()
    out = term.getvalue()
    # The record erased the status line, printed itself, then the status came back; close() ends the line.
    assert out == (
        "\r\x1b[K[1/10 10%] loss 5.0\r\x1b[Kstep=0 loss=5.0\n\r\x1b[K[1/10 10%] loss 5.0\r\x1b[K[2/10 20%] loss 4.0\n"
    )


def test_status_line_only_on_an_interactive_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert wants_status_line(FakeTerminal()) and not wants_status_line(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not wants_status_line(FakeTerminal())
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TERM", "dumb")
    assert not wants_status_line(FakeTerminal())


def test_train_line_jsonl_and_tensorboard_carry_internevos_keys(tiny_config, tmp_path, caplog):
    """v0.3.4's keys in its order (tgs/* between tgs and lr), lr/adam_beta2 as InternEvo prints them, and the same
    values in metrics.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing import event_accumulator

    from internevo_jax.monitoring.alerts import Monitor
    from internevo_jax.monitoring.metrics import line_keys, parse_line

    cfg = tiny_config("data.total_steps=100", "monitor.tensorboard.queue_max_length=1")
    types = ["en", "cn", "code"]
    monitor = Monitor(cfg.monitor, cfg.JOB_NAME, tmp_path, enabled=False)
    reporter = Reporter(cfg, tmp_path, types, dp=8, world=8, monitor=monitor, status=False)
    stats = dict(num_samples_in_batch=4, largest_length=30, largest_batch=2, smallest_batch=2)
    metrics = dict(loss=2.5, lr=np.float32(0.1), adam_beta2=np.float32(0.95), loss_scale=1.0, grad_norm=1.5, acc=0.5)
    metrics.update(perplexity=3.0, loss_from_metric=1.1, type_acc=[0.5, 0, 0], type_tokens=[64, 0, 0])
    metrics.update(type_loss=[1.1, float("nan"), float("nan")])
    lines = []
    with caplog.at_level(logging.INFO, logger="internevo_jax"):
        reporter.log.addHandler(caplog.handler)
        try:
            for step in range(12):
                finite = step != 3  # a skipped update: counted in no tgs/* statistic, step_count stays
                values = dict(
                    metrics,
                    finite=np.bool_(finite),
                    step_count=np.int32(step + (step < 3)),
                    inf_nan_skip_batches=int(step > 3),
                )
                lines.append(reporter.train(step, values, stats, 1024 * (step + 1), micro_num=2, seconds=0.5 + step))
        finally:
            reporter.log.removeHandler(caplog.handler)
            reporter.close()
    messages = [r.getMessage() for r in caplog.records if "tflops=" in r.getMessage()]
    assert len(messages) == 12
    keys = tuple(k for k in line_keys(types) if k != "moe_loss")  # a dense model's line
    assert list(parse_line(messages[0])) == list(keys)
    assert " ".join(keys[3:11]) == (
        "tgs (tokens/gpu/second) tgs/last_tgs_1 tgs/tgs_all tgs/tgs_avg tgs/tgs_SMA tgs/last_tgs_10 tgs/last_tgs_50 lr"
    )
    # tiny: lr 3e-3, warmup int(100 * 0.1) = 10 steps; after 1 update InternEvo prints 2 / 10 * 3e-3.
    assert " lr=0.0006000000000000001 " in messages[0] and " adam_beta2=0.95 " in messages[0]
    assert " tgs/last_tgs_10=0 tgs/last_tgs_50=0 " in messages[0]
    tokens = 2 * 64 * 8 / 8  # micro_num x packed_length x dp / world
    counted = [s for s in range(12) if s != 3]
    assert lines[11]["tgs/tgs_all"] == round(tokens * 11 / sum(0.5 + s for s in counted), 2)
    assert lines[3]["tgs/last_tgs_1"] == round(tokens / 3.5, 2) and lines[3]["tgs/tgs_all"] == lines[2]["tgs/tgs_all"]
    assert lines[10]["tgs/last_tgs_10"] == round(tokens * 10 / sum(0.5 + s for s in counted[:10]), 2)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for line, record, message in zip(lines, records, messages, strict=True):
        parsed = parse_line(message)
        for key in keys:
            if key.startswith(("tgs", "lr", "adam_beta2")):
                assert record[key] == line[key] == parsed[key], key
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboards"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"tgs", "tgs/last_tgs_1", "tgs/tgs_all", "tgs/tgs_avg", "tgs/tgs_SMA", "tgs/last_tgs_10"} <= set(tags)
    assert [e.value for e in acc.Scalars("tgs/tgs_all")][-1] == pytest.approx(lines[11]["tgs/tgs_all"])
    assert [e.value for e in acc.Scalars("lr")][0] == pytest.approx(0.0006)
