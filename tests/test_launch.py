"""launch.py as a user runs it: overrides, the InternEvo log line, the metrics file, and clean config errors."""

import json
import math
import os
import subprocess
import sys

from internevo_jax.monitoring.metrics import line_keys, parse_line

from .conftest import ROOT


def run(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a user's laptop
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_with_overrides_logs_internevo_line(tmp_path):
    out = run(
        f"--config={ROOT / 'configs' / 'demo.py'}",
        "--config.data.total_steps=3",
        "--config.model.num_layers=3",
        "--config.ckpt.enable_save_ckpt=False",
        f"--config.run_folder={tmp_path / 'run'}",
        "--launcher=local",
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    lines = [line for line in out.stdout.splitlines() if "tflops=" in line]
    assert len(lines) == 3
    assert "INFO reporter.py:" in lines[0] and " in train -- tflops=" in lines[0]
    # dummy data's types, as InternEvo names them; a dense model's line has no moe_loss
    keys = [k for k in line_keys(["en", "cn", "code"]) if k != "moe_loss"]
    at = [lines[0].find(f" {key}=") for key in keys]
    assert min(at) >= 0 and at == sorted(at), list(zip(keys, at, strict=True))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line, record in zip(lines, records, strict=True):
        parsed = parse_line(line)
        for key in ("step", "loss", "lr", "grad_norm", "num_consumed_tokens", "adam_beta2", "largest_length"):
            assert parsed[key] == record[key], (key, parsed[key], record[key])
        assert parsed["tgs (tokens/gpu/second)"] == record["tgs"]
        for key in ("acc", "perplexity", "acc/en", "tokens/en", "loss_from_metric", "loss/en"):
            assert parsed[key] == record[key], (key, parsed[key], record[key])
        assert parsed["tokens/cn"] == 0 and math.isnan(parsed["loss/cn"]) and record["loss/cn"] is None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["num_layers"] == 3 and config["lr_scheduler"]["total_steps"] == 3


def test_misspelt_key_exits_with_suggestion(tmp_path):
    out = run(f"--config={ROOT / 'configs' / 'demo.py'}", "--config.data.micro_bzs=2", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "data.micro_bzs" in out.stderr and "did you mean: data.micro_bsz" in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_type_exits_with_field_and_type(tmp_path):
    out = run(f"--config={ROOT / 'configs' / 'demo.py'}", "--config.data.micro_num=two", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "data.micro_num expects int" in out.stderr and "Traceback" not in out.stderr


def test_unknown_flag_is_rejected(tmp_path):
    out = run(f"--config={ROOT / 'configs' / 'demo.py'}", "--sed=3", tmp_path=tmp_path)
    assert out.returncode == 2 and "unrecognized arguments: --sed=3" in out.stderr


def test_a_run_that_keeps_diverging_stops_with_exit_6(tmp_path):
    # lr 1e6 blows the weights up within two updates; every later gradient is non-finite and skipped.
    out = run(
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        "--config.adam.lr=1e6",
        "--config.lr_scheduler.warmup_ratio=0",
        "--config.hybrid_zero_optimizer.clip_grad_norm=0",
        "--config.hybrid_zero_optimizer.max_consecutive_inf_nan=3",
        "--config.data.total_steps=12",
        f"--config.run_folder={tmp_path / 'run'}",
        "--launcher=local",
        tmp_path=tmp_path,
    )
    assert out.returncode == 6, out.stderr + out.stdout
    assert "training diverged: steps 2..4 all had non-finite gradients" in out.stdout, out.stdout[-2000:]
    assert out.stdout.count("non-finite grad norm; update skipped") == 3


def test_print_config_prints_the_resolved_config_and_exits_without_running(tmp_path):
    secret = "https://open.feishu.cn/open-apis/bot/v2/hook/9f3c1e2a-1234-5678-9abc-def012345678"
    out = run(
        f"--config={ROOT / 'configs' / 'demo.py'}",
        "--config.model.num_layers",
        "2",
        "--config.ckpt.auto_resume",
        "false",
        f"--config.monitor.alert.feishu_alert_address={secret}",
        f"--config.run_folder={tmp_path / 'run'}",
        "--print_config",
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    config = json.loads(out.stdout)
    assert config["model"]["num_layers"] == 2 and config["ckpt"]["auto_resume"] is False
    assert config["data"]["packed_length"] == 512  # resolved: derived keys filled in
    assert "9f3c1e2a" not in out.stdout and config["monitor"]["alert"]["feishu_alert_address"].endswith("/hook/***")
    assert not (tmp_path / "run").exists() and not (tmp_path / "RUN").exists()  # nothing started, nothing written
    assert "compiled" not in out.stderr


def test_out_of_range_and_deeply_nested_overrides_exit_2_naming_the_override(tmp_path):
    out = run(f"--config={ROOT / 'configs' / 'demo.py'}", "--config.model.num_layers", "0", tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "config error: --config.model.num_layers=0: model.num_layers must be >= 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr
    out = run(f"--config={ROOT / 'configs' / 'demo.py'}", "--config.adam.lr=" + "-" * 5000 + "1", tmp_path=tmp_path)
    assert out.returncode == 2 and "nested too deeply" in out.stderr and "Traceback" not in out.stderr
