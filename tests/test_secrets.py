"""Secrets never reach a file in clear: config.json, the TensorBoard config text, checkpoint meta, --print_config."""

import json

from internevo_jax import Trainer
from internevo_jax import config as config_lib
from internevo_jax.checkpoint.arrays import read_meta
from internevo_jax.config.redaction import redact, redact_config

from .conftest import ROOT

WEBHOOK = "https://open.feishu.cn/open-apis/bot/v2/hook/9f3c1e2a-77aa-4b1c-8d2e-0123456789ab"
MONITOR = "http://probe:hunter22@127.0.0.1:9/heartbeat?token=sekrit-tok&job=tiny"
MIRROR = "https://reader:pw-4711@data.example.com/corpus/train?X-Amz-Signature=abcdef0123&part=1"
CLEAR = ("9f3c1e2a", "hunter22", "sekrit-tok", "pw-4711", "abcdef0123")


def test_redact_config_masks_addresses_and_url_credentials_only():
    values = {
        "monitor": {"alert": {"feishu_alert_address": WEBHOOK, "light_monitor_address": MONITOR}},
        "data": {"train_folder": MIRROR, "tokenizer_path": "/models/tokenizer.model"},
        "FEISHU_WEBHOOK": WEBHOOK,
        "ckpt": {"save_ckpt_folder": "local:/ckpt/2024-run-123456789"},
    }
    out = redact_config(values)
    assert (
        out["monitor"]["alert"]["feishu_alert_address"]
        == redact(WEBHOOK)
        == ("https://open.feishu.cn/open-apis/bot/v2/hook/***")
    )
    assert out["monitor"]["alert"]["light_monitor_address"] == "http://***@127.0.0.1:9/heartbeat?token=***&job=***"
    assert out["data"]["train_folder"] == (
        "https://***@data.example.com/corpus/train?X-Amz-Signature=***&part=1"  # the path stays readable
    )
    assert out["FEISHU_WEBHOOK"] == redact(WEBHOOK)
    assert out["data"]["tokenizer_path"] == "/models/tokenizer.model"  # "tokenizer" is no "token"
    assert out["ckpt"] == values["ckpt"]  # not URLs: unchanged
    assert values["FEISHU_WEBHOOK"] == WEBHOOK  # a copy


def test_no_secret_reaches_a_file_in_clear(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    overrides = [
        "data.total_steps=2",
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='{ckpt}'",
        "ckpt.checkpoint_every=1",
        f"run_folder='{run}'",
        "enable_tb=True",
        "monitor.alert.enable_feishu_alert=True",
        "monitor.alert.heartbeat_every=1000",
        f"monitor.alert.feishu_alert_address='{WEBHOOK}'",
        f"monitor.alert.light_monitor_address='{MONITOR}'",
        f"generation.data_folder='{MIRROR}'",
        f"FEISHU_WEBHOOK='{WEBHOOK}'",
    ]
    cfg = config_lib.load(ROOT / "configs" / "tiny.py", [f"--config.{o}" for o in overrides])
    assert cfg.monitor.alert.feishu_alert_address == WEBHOOK  # the run itself uses the real address
    Trainer(cfg).fit()
    written = [p for p in (*run.rglob("*"), *ckpt.rglob("*")) if p.is_file()]
    assert any(p.name == "config.json" for p in written) and any("tfevents" in p.name for p in written)
    for path in written:
        data = path.read_bytes()
        leaked = [s for s in CLEAR if s.encode() in data]
        assert not leaked, f"{path} holds {leaked} in clear"
    saved = json.loads(read_meta(ckpt / "2")["config"])
    assert saved["monitor"]["alert"]["feishu_alert_address"] == "https://open.feishu.cn/open-apis/bot/v2/hook/***"
    assert b"open-apis/bot/v2/hook/***" in b"".join(p.read_bytes() for p in written if "tfevents" in p.name)
