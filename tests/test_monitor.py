"""Alerts, heartbeats, redaction, the alert file, slow-step warnings and the hang watchdog (monitoring/alerts.py).

A local HTTP server stands in for Feishu and the light monitor. In-process monitors keep the watchdog off
(hang_timeout_seconds=0): faulthandler's timer ends the process it runs in, so the watchdog runs in subprocesses.
"""

import base64
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from internevo_jax.config import default_config
from internevo_jax.config.redaction import redact
from internevo_jax.monitoring.alerts import Monitor
from internevo_jax.monitoring.logger import get_logger

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "9f3c1e2a-5b7d-4c1e-8f00-123456789abc"


class Hook:
    """A webhook on 127.0.0.1 that records every POST as (path, headers, parsed body)."""

    def __init__(self, status: int = 200, reply: dict | None = None):
        self.posts: list[tuple[str, dict, dict]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append((self.path, dict(self.headers), json.loads(body)))
                answer = json.dumps(reply or {"code": 0}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def bodies(self, path_prefix: str = "") -> list[dict]:
        return [body for path, _, body in self.posts if path.startswith(path_prefix)]


@pytest.fixture
def hook(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy from the environment must not swallow local requests
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = Hook()
    yield server
    server.server.shutdown()


@pytest.fixture
def logs(caplog, monkeypatch):
    """Log records of the package logger (it does not propagate to the root logger that caplog watches, unless told)."""
    monkeypatch.setattr(get_logger(), "propagate", True)
    caplog.set_level(logging.INFO, logger="internevo_jax")
    return caplog


def monitor_config(hang_timeout_seconds: float = 0.0, **alert):
    cfg = default_config().monitor
    cfg.hang_timeout_seconds = hang_timeout_seconds
    cfg.alert.update(alert)
    return cfg


def titles(bodies: list[dict]) -> list[str]:
    return [b["content"]["post"]["zh_cn"]["title"] for b in bodies]


def texts(bodies: list[dict]) -> list[str]:
    return [b["content"]["post"]["zh_cn"]["content"][0][0]["text"] for b in bodies]


def test_feishu_alerts(hook, tmp_path):
    cfg = monitor_config(enable_feishu_alert=True, feishu_alert_address=f"{hook.url}/open-apis/bot/v2/hook/{TOKEN}")
    monitor = Monitor(cfg, "job7", tmp_path)
    monitor.start({"model": "INTERNLM2", "mesh": "data=8"})
    monitor.step(1, {"loss": 2.0, "grad_norm": 1.0}, 1.0)
    monitor.step(2, {"loss": 2.9, "grad_norm": 1.0}, 1.0)  # 2.9 < 1.5 x 2.0: no spike
    monitor.step(3, {"loss": 4.4, "grad_norm": 1.0}, 1.0)  # 4.4 > 1.5 x 2.9: spike
    monitor.step(4, {"loss": float("nan"), "grad_norm": 1.0}, 1.0)
    monitor.step(5, {"loss": 9.0, "grad_norm": float("inf")}, 1.0)  # non-finite grad norm; no spike vs a NaN loss

    def deep(n):
        if n == 0:
            raise ValueError("boom")
        deep(n - 1)

    try:
        deep(8)
    except ValueError as exc:
        monitor.failure(exc)
    monitor.finish({"steps": 5, "loss": 9.0})
    monitor.close()

    assert [(path.split("/hook/")[1], h["Content-Type"]) for path, h, _ in hook.posts] == [
        (TOKEN, "application/json")
    ] * 6
    bodies = hook.bodies()
    assert {b["msg_type"] for b in bodies} == {"post"}
    assert titles(bodies) == [
        "job7: start",
        "job7: loss spike",
        "job7: non-finite loss",
        "job7: non-finite loss",
        "job7: failed",
        "job7: finished",
    ]
    start, spike, nan_loss, inf_grad, failed, finished = texts(bodies)
    assert start == "model: INTERNLM2\nmesh: data=8"
    assert spike.startswith("step 3: loss 4.4000 > 1.5 x previous step's 2.9000")
    assert nan_loss == "step 4: loss=nan"
    assert inf_grad == "step 5: grad_norm=inf"
    failed_lines = failed.splitlines()
    assert failed_lines[0] == "ValueError: boom" and failed_lines[-1] == "ValueError: boom"
    assert len(failed_lines) == 1 + 10 and "in deep" in failed  # the last 10 traceback lines
    assert finished == "steps: 5\nloss: 9.0"


def test_json_webhook_format(hook, tmp_path):
    cfg = monitor_config(enable_feishu_alert=True, feishu_alert_address=f"{hook.url}/alerts", webhook_format="json")
    monitor = Monitor(cfg, "job7", tmp_path)
    monitor.notify("preempted", "SIGTERM: saving a checkpoint")
    monitor.close()
    (body,) = hook.bodies("/alerts")
    assert set(body) == {"job", "title", "message", "time", "host"}
    assert (body["job"], body["title"], body["message"]) == ("job7", "preempted", "SIGTERM: saving a checkpoint")
    assert abs(body["time"] - time.time()) < 60 and body["host"] == socket.gethostname()


def test_light_monitor_heartbeat(hook, tmp_path):
    address = hook.url.replace("//", "//grafana:p%40ss@") + "/lm"  # credentials in the address go as Basic auth
    cfg = monitor_config(enable_feishu_alert=True, light_monitor_address=address, heartbeat_every=2)
    monitor = Monitor(cfg, "job7", tmp_path)
    for step in range(1, 6):
        monitor.step(
            step, {"loss": 3.0 - 0.1 * step, "tflops": 100.0, "grad_norm": float("nan") if step == 4 else 1.0}, 1
        )
    monitor.close()
    bodies = hook.bodies("/lm")
    assert [b["step"] for b in bodies] == [2, 4]
    assert all(b["type"] == "train_metrics" and b["job"] == "job7" and b["tflops"] == 100.0 for b in bodies)
    assert bodies[0]["loss"] == pytest.approx(2.8) and bodies[0]["grad_norm"] == 1.0
    assert bodies[1]["grad_norm"] is None  # NaN is not JSON; the body stays valid
    assert hook.bodies("/") == bodies  # no alert went anywhere (no webhook address)
    assert {h["Authorization"] for _, h, _ in hook.posts} == {"Basic " + base64.b64encode(b"grafana:p@ss").decode()}


@pytest.mark.parametrize(
    "address, expected",
    [
        (
            f"https://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}",
            "https://open.feishu.cn/open-apis/bot/v2/hook/***",
        ),
        ("http://user:pass@10.0.0.1:8080/x?token=abc", "http://***@10.0.0.1:8080/x?token=***"),
        (
            "https://hooks.slack.com/services/T0000AAAA/B0000BBBB/XXXXXXXXXXXXXXXXXXXXXXXX",
            "https://hooks.slack.com/services/***/***/***",
        ),
        ("http://10.1.2.3:9000", "http://10.1.2.3:9000"),
        ("http://host/push?job=a&key=s3cr3t&flag#frag", "http://host/push?job=***&key=***&***#***"),
        ("10.0.0.1:8080/hook/abc", "***"),
        ("http://host:port/x", "***"),
        ("http://[::1/x", "***"),
    ],
)
def test_redact(address, expected):
    assert redact(address) == expected


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("endpoint", ["http 500", "feishu rejects", "closed port", "malformed"])
def test_send_failures_warn_once_without_secrets(endpoint, logs, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = None
    if endpoint == "malformed":  # http.client quotes the path of a URL with a space in its error
        address = f"http://127.0.0.1:{closed_port()}/hook/{TOKEN} x"
        expected = redact(address)
    elif endpoint == "closed port":
        base = f"http://bot:pw-{TOKEN[:8]}@127.0.0.1:{closed_port()}"
        address, expected = (
            f"{base}/hook?token={TOKEN}",
            f"http://***@127.0.0.1:{base.rsplit(':', 1)[1]}/hook?token=***",
        )
    else:
        server = Hook(500) if endpoint == "http 500" else Hook(200, {"code": 19021, "msg": "sign match fail"})
        address, expected = f"{server.url}/open-apis/bot/v2/hook/{TOKEN}", f"{server.url}/open-apis/bot/v2/hook/***"
    cfg = monitor_config(enable_feishu_alert=True, feishu_alert_address=address, light_monitor_address=address)
    monitor = Monitor(cfg, "job7", tmp_path)
    monitor.start({"address": address})  # a secret quoted in an alert is redacted too
    monitor.notify("stop file", "step 3")
    monitor.close()
    if server is not None:
        assert len(server.posts) == 2 and expected in texts(server.bodies())[0]
        assert TOKEN not in json.dumps(server.bodies())
        server.server.shutdown()
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per address, however many sends fail
    assert expected in warnings[0] or ("rejected" in warnings[0] and redact(address) in warnings[0])
    every_line = "\n".join(r.getMessage() for r in logs.records)
    assert TOKEN not in every_line and TOKEN[:8] not in every_line and redact(address) in every_line


def test_alert_file_and_disabled_monitors(hook, tmp_path):
    alert_file = tmp_path / "alerts" / "sub" / "alert.log"
    address = f"{hook.url}/hook/{TOKEN}"
    # Alert file with alerts off: lines are written, nothing is sent (no alert, no heartbeat).
    cfg = monitor_config(
        alert_file_path=str(alert_file), feishu_alert_address=address, light_monitor_address=address, heartbeat_every=1
    )
    monitor = Monitor(cfg, "job7", tmp_path)
    monitor.step(1, {"loss": 2.0}, 1.0)
    monitor.notify("stop file", "stopping at step 3")
    monitor.notify("failed", "line one\nline two")
    monitor.close()
    lines = alert_file.read_text().splitlines()
    assert [line.split("\t")[1:] for line in lines] == [
        ["stop file", "stopping at step 3"],
        ["failed", "line one\\nline two"],
    ]
    assert all(time.strptime(line.split("\t")[0], "%Y-%m-%d %H:%M:%S") for line in lines)
    # A process other than 0: everything configured, nothing sent or written.
    cfg = monitor_config(
        enable_feishu_alert=True,
        feishu_alert_address=address,
        light_monitor_address=address,
        heartbeat_every=1,
        alert_file_path=str(alert_file),
    )
    monitor = Monitor(cfg, "job7", tmp_path, enabled=False)
    monitor.start({})
    monitor.step(1, {"loss": float("nan")}, 1.0)
    monitor.notify("stop file", "step 1")
    monitor.finish({})
    monitor.close()
    assert hook.posts == [] and len(alert_file.read_text().splitlines()) == 2


def test_slow_step_warning(logs, tmp_path):
    monitor = Monitor(monitor_config(), "job7", tmp_path)
    # Step 1 (compilation) is not counted, so step 6 comes before 5 step times are known: no verdict yet.
    # 2.5 s is under 3 x the median of 1 s; 5 s is over.
    for step, seconds in enumerate([30.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 2.5, 5.0], start=1):
        monitor.step(step, {"loss": 2.0}, seconds)
    monitor.close()
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "step 10 took 5.000 s, 5.0 x the median 1.000 s of the last 8"
    ), warnings


HANG = """
import sys, threading
from pathlib import Path
from internevo_jax.config import default_config
from internevo_jax.monitoring.alerts import Monitor
cfg = default_config().monitor
cfg.hang_timeout_seconds = 1.0
cfg.alert.update(enable_feishu_alert=True, feishu_alert_address=sys.argv[1])
monitor = Monitor(cfg, "hangjob", Path(sys.argv[2]))
monitor.start({"model": "tiny"})
monitor.step(6, {"loss": 2.0}, 0.5)
monitor.arm("step 7")
threading.Event().wait()  # blocked in a C lock wait, as in a stuck collective
"""

REARMED = """
import sys, time
from pathlib import Path
from internevo_jax.config import default_config
from internevo_jax.monitoring.alerts import Monitor
cfg = default_config().monitor
cfg.hang_timeout_seconds = 1.0
cfg.alert.update(enable_feishu_alert=True, feishu_alert_address=sys.argv[1])
monitor = Monitor(cfg, "okjob", Path(sys.argv[2]))
monitor.start({})
for step in range(10):
    monitor.arm(f"step {step}")
    time.sleep(0.2)
monitor.close()
time.sleep(2.5)  # past the last arm's timeout + grace: close() must have cancelled both
print("survived")
"""


def test_hang_watchdog(hook, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, f"{hook.url}/{name}", str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, code in (("hang", HANG), ("rearmed", REARMED))
    }  # both at once: the import of the package dominates
    try:
        out = {name: proc.communicate(timeout=30) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()  # no-op unless a watchdog failed to end its process

    stdout, stderr = out["hang"]
    assert procs["hang"].returncode == 4, (stdout, stderr)  # launch.py's "hang" exit code
    assert "most recent call first" in stderr and "in wait" in stderr, stderr  # every thread's stack
    assert "hang watchdog fired" in stdout and "'step 7'" in stdout
    assert titles(hook.bodies("/hang")) == ["hangjob: start", "hangjob: hang"]
    assert texts(hook.bodies("/hang"))[1].startswith("no progress for 1 s in 'step 7' (last reported step: 6)")

    stdout, stderr = out["rearmed"]
    assert procs["rearmed"].returncode == 0 and "survived" in stdout, (stdout, stderr)
    assert "hang watchdog fired" not in stdout and "Timeout" not in stderr
    assert titles(hook.bodies("/rearmed")) == ["okjob: start"]
