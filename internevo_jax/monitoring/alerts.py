"""Alerts, light-monitor heartbeats, slow-step warnings and the hang watchdog (InternEvo MON-03/04/05/08, T-06).

Alerts go to a Feishu bot ("post" message, InternEvo's body) or a generic JSON webhook, and as one line each to
``alert_file_path``. Every HTTP send happens on a background daemon thread with short timeouts, so a slow or dead
endpoint never stalls training; a failing endpoint is reported once, with its address redacted.

The hang watchdog replaces InternEvo's SIGALRM ``llm_timeout`` and its 300 s ``MonitorTracker`` poll. A JAX step that
hangs usually sits inside a C call (a collective waiting for a peer, a device wait), where a SIGALRM handler or a Python
check of the main thread never runs. ``faulthandler.dump_traceback_later`` runs on its own C thread: at the deadline it
writes every thread's Python stack to stderr and ends the process with exit code 1, so the launcher sees a failure
instead of a job that burns its allocation forever. A Python daemon thread sends the "hang" alert a little earlier, so
someone learns why the job died.
"""

from __future__ import annotations

import base64
import collections
import faulthandler
import json
import math
import os
import pathlib
import queue
import socket
import statistics
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import ml_collections

from internevo_jax.config.redaction import redact, redact_parts
from internevo_jax.errors import EXIT_HANG
from internevo_jax.monitoring.logger import get_logger

SEND_TIMEOUT = 5.0  # seconds per HTTP request
CLOSE_TIMEOUT = 5.0  # how long close() waits for queued sends
SLOW_STEP_WINDOW = 50  # step times kept for the slow-step median
SLOW_STEP_MIN_HISTORY = 5  # no slow-step verdict before this many step times (the first, compiling, is dropped)
TRACEBACK_LINES = 10  # T-06 / MON-03: an exception alert carries the last 10 traceback lines


def _scrub(text: str, address: str) -> str:
    """``text`` with ``address`` and each secret piece of it replaced, for log lines about that address."""
    redacted, secrets = redact_parts(address)
    text = text.replace(address, redacted)
    for secret in sorted(secrets[1:], key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _stderr() -> Any:
    # faulthandler writes to a file descriptor; under output capture (pytest capsys, notebooks) sys.stderr has none.
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


def _json_value(value: Any) -> Any:
    # JSON has no NaN/inf (json.dumps would write invalid JSON), and numpy/jax scalars are not JSON-serializable.
    if isinstance(value, int | str) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class Monitor:
    """Alerts, heartbeats, slow-step warnings and the hang watchdog of one training process."""

    def __init__(
        self, monitor: ml_collections.ConfigDict, job_name: str, run_dir: pathlib.Path, enabled: bool = True
    ) -> None:
        """Reads the ``monitor`` config section; starts no thread yet.

        Args:
            monitor: the ``monitor`` config section.
            job_name: ``JOB_NAME``; titles and bodies name it.
            run_dir: the run folder, named in the hang message.
            enabled: False on processes other than 0: they send no alerts or heartbeats and write no alert file,
                but their hang watchdog still runs (any process can be the one that hangs).
        """
        alert = monitor.alert
        self.job_name = job_name
        self.run_dir = pathlib.Path(run_dir)
        self.enabled = enabled
        self.webhook = alert.feishu_alert_address if enabled and alert.enable_feishu_alert else None
        # MON-05: InternEvo starts the light-monitor client only when alerts are enabled (L-02).
        self.light_monitor = alert.light_monitor_address if enabled and alert.enable_feishu_alert else None
        self.alert_file = pathlib.Path(alert.alert_file_path) if enabled and alert.alert_file_path else None
        self.webhook_format = alert.webhook_format
        self.loss_spike_ratio = alert.loss_spike_ratio
        self.heartbeat_every = alert.heartbeat_every
        self.hang_timeout = float(monitor.hang_timeout_seconds)
        # The alert goes at the timeout; the stacks and the exit come after this grace, so the alert can be delivered.
        self.hang_grace = min(30.0, max(1.0, 0.1 * self.hang_timeout))
        self.slow_step_ratio = monitor.slow_step_ratio
        self.log = get_logger()
        self.host = socket.gethostname()

        self._prev_loss: float | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=SLOW_STEP_WINDOW)
        self._steps_seen = 0
        self._last_step: int | None = None
        self._closed = False
        self._warned: set[str] = set()

        self._queue: queue.Queue[tuple[Callable[[], None], str] | None] = queue.Queue(maxsize=256)
        self._sender: threading.Thread | None = None

        self._cond = threading.Condition()
        self._deadline: float | None = None  # time.monotonic() at which the armed watchdog fires
        self._what = ""
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Lifecycle, called by the Trainer
    # ------------------------------------------------------------------------------------------------------------

    def start(self, info: dict[str, Any]) -> None:
        """Sends the "start" alert with ``info`` (model, mesh, run folder, ...) and arms the hang watchdog."""
        if self.enabled:
            sinks = [f"alerts -> {redact(self.webhook)} ({self.webhook_format})" if self.webhook else "alerts off"]
            if self.light_monitor:
                sinks.append(f"heartbeats every {self.heartbeat_every} steps -> {redact(self.light_monitor)}")
            if self.alert_file:
                sinks.append(f"alert file {self.alert_file}")
            watchdog = f"hang watchdog {self.hang_timeout:g} s" if self.hang_timeout > 0 else "hang watchdog off"
            self.log.info("monitor: %s; %s", "; ".join(sinks), watchdog)
        self._alert("start", "\n".join(f"{k}: {v}" for k, v in info.items()))
        self.arm("start")

    def arm(self, what: str = "step") -> None:
        """(Re-)arms the hang watchdog for ``what`` (e.g. "train step 7"); call before each step or eval batch."""
        if self.hang_timeout <= 0 or self._closed:
            return
        # One C-level timer per process; a new call replaces the previous deadline.
        faulthandler.dump_traceback_later(self.hang_timeout + self.hang_grace, exit=True, file=_stderr())
        with self._cond:
            self._deadline = time.monotonic() + self.hang_timeout
            self._what = what
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="internevo-hang-watchdog", daemon=True)
                self._watchdog.start()
            self._cond.notify()

    def step(self, step: int, values: dict[str, float], seconds: float) -> None:
        """Checks one reported step: loss spike, non-finite loss/grad norm, heartbeat, slow step.

        Args:
            step: the logged step (InternEvo's batch_count).
            values: the step's metrics; "loss" and "grad_norm" are checked when present.
            seconds: the step's wall time.
        """
        self._last_step = step
        loss = None if values.get("loss") is None else float(values["loss"])
        grad_norm = None if values.get("grad_norm") is None else float(values["grad_norm"])
        checked = (("loss", loss), ("grad_norm", grad_norm))
        bad = [f"{k}={v}" for k, v in checked if v is not None and not math.isfinite(v)]
        if bad:
            self._alert("non-finite loss", f"step {step}: {', '.join(bad)}")
        elif loss is not None and self._prev_loss is not None and loss > self.loss_spike_ratio * self._prev_loss:
            prev, ratio = self._prev_loss, self.loss_spike_ratio
            self._alert("loss spike", f"step {step}: loss {loss:.4f} > {ratio:g} x previous step's {prev:.4f}")
        self._prev_loss = loss if loss is not None and math.isfinite(loss) else None

        if self.light_monitor and step % self.heartbeat_every == 0:
            body = {"type": "train_metrics", "job": self.job_name, "step": step, "time": time.time()}
            body.update({k: _json_value(v) for k, v in values.items()})
            self._send(self.light_monitor, body)

        self._steps_seen += 1
        if self._steps_seen == 1:
            return  # the first step's time includes compilation
        if self.enabled and len(self._step_times) >= SLOW_STEP_MIN_HISTORY:
            median = statistics.median(self._step_times)
            if seconds > self.slow_step_ratio * median:
                self.log.warning(
                    "step %d took %.3f s, %.1f x the median %.3f s of the last %d steps (monitor.slow_step_ratio=%g)",
                    step,
                    seconds,
                    seconds / median,
                    median,
                    len(self._step_times),
                    self.slow_step_ratio,
                )
        self._step_times.append(seconds)

    def notify(self, title: str, message: str) -> None:
        """Sends any alert, e.g. a stop-file or preemption notice."""
        self._alert(title, message)

    def finish(self, summary: dict[str, Any]) -> None:
        """Disarms the watchdog and sends the "finished" alert with ``summary``, or "stopped (why)" when a signal or
        the stop file ended the run early (``summary["stopped"]``)."""
        self.disarm()
        stopped = summary.get("stopped")
        title = f"stopped ({stopped})" if stopped else "finished"
        self._alert(title, "\n".join(f"{k}: {v}" for k, v in summary.items()))

    def failure(self, exc: BaseException) -> None:
        """Sends the exception alert: the exception and the last lines of its traceback (T-06)."""
        lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
        self._alert("failed", f"{type(exc).__name__}: {exc}\n" + "\n".join(lines[-TRACEBACK_LINES:]))

    def close(self) -> None:
        """Disarms the watchdog and waits (at most ~5 s) for queued sends; later calls do nothing."""
        self.disarm()
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._cond.notify()  # the watchdog thread sees _closed and ends
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join(CLOSE_TIMEOUT)
            if self._sender.is_alive():
                self.log.warning("monitor: gave up waiting %.0f s for queued alerts/heartbeats", CLOSE_TIMEOUT)

    def disarm(self) -> None:
        """Stops the hang watchdog until the next ``arm()``."""
        if self.hang_timeout <= 0:
            return
        faulthandler.cancel_dump_traceback_later()
        with self._cond:
            self._deadline = None
            self._cond.notify()

    # ------------------------------------------------------------------------------------------------------------
    # Hang watchdog thread
    # ------------------------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._deadline is None or time.monotonic() < self._deadline):
                    self._cond.wait(None if self._deadline is None else self._deadline - time.monotonic())
                if self._closed:
                    return
                self._deadline = None  # one alert per arming
                what = self._what
            self._on_hang(what)

    def _on_hang(self, what: str) -> None:
        last = "none yet" if self._last_step is None else str(self._last_step)
        message = (
            f"no progress for {self.hang_timeout:g} s in {what!r} (last reported step: {last}) on {self.host}; "
            f"every thread's stack goes to stderr and the process exits with code {EXIT_HANG} "
            f"(monitor.hang_timeout_seconds={self.hang_timeout:g}; run folder {self.run_dir})"
        )
        self.log.error("hang watchdog fired: %s", message)
        # Sent from this thread, not the queue: the sender may be busy with a slow heartbeat, and the process is
        # about to end.
        if self.alert_file:
            self._write_alert_file(self.alert_file, "hang", message)
        if self.webhook:
            timeout = min(SEND_TIMEOUT, 0.8 * self.hang_grace)
            self._post(self.webhook, self._alert_body("hang", message), timeout)
        # Exit with the "hang" code so a restart policy can tell it apart (config 2, checkpoint 3, data 5,
        # numerics 6). This thread runs because a stuck XLA call releases the GIL; if something holds the GIL
        # instead, faulthandler's C timer still dumps the stacks and exits (with code 1) after the grace period.
        faulthandler.cancel_dump_traceback_later()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HANG)

    # ------------------------------------------------------------------------------------------------------------
    # Sending
    # ------------------------------------------------------------------------------------------------------------

    def _alert(self, title: str, message: str) -> None:
        if not self.enabled or self._closed:
            return
        for address in (self.webhook, self.light_monitor):
            if address:  # a traceback or config dump could quote an address; never forward it
                message = message.replace(address, redact(address))
        if alert_file := self.alert_file:  # a local: the lambda runs later, on the sender thread
            self._enqueue(lambda: self._write_alert_file(alert_file, title, message), str(alert_file))
        if self.webhook:
            self._send(self.webhook, self._alert_body(title, message))

    def _alert_body(self, title: str, message: str) -> dict[str, Any]:
        if self.webhook_format == "feishu":  # InternEvo's send_feishu_msg_with_webhook body
            post = {"zh_cn": {"title": f"{self.job_name}: {title}", "content": [[{"tag": "text", "text": message}]]}}
            return {"msg_type": "post", "content": {"post": post}}
        return {"job": self.job_name, "title": title, "message": message, "time": time.time(), "host": self.host}

    def _write_alert_file(self, alert_file: pathlib.Path, title: str, message: str) -> None:
        try:
            alert_file.parent.mkdir(parents=True, exist_ok=True)
            with open(alert_file, "a", encoding="utf-8") as f:
                one_line = message.replace("\n", "\\n")  # one line per alert; tracebacks keep their breaks as \n
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{title}\t{one_line}\n")
        except OSError as exc:
            self._warn_once(str(alert_file), f"cannot append to the alert file {alert_file}: {exc}")

    def _send(self, address: str, body: dict[str, Any]) -> None:
        self._enqueue(lambda: self._post(address, body, SEND_TIMEOUT), address)

    def _enqueue(self, job: Callable[[], None], key: str) -> None:
        if self._sender is None:
            self._sender = threading.Thread(target=self._drain, name="internevo-monitor-sender", daemon=True)
            self._sender.start()
        try:
            self._queue.put_nowait((job, key))
        except queue.Full:  # the endpoint is far behind; dropping beats blocking a training step
            self._warn_once("queue", "monitor: send queue full, dropping alerts/heartbeats")

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            job, key = item
            try:
                job()
            except Exception as exc:  # the sender thread must outlive any one bad send
                self._warn_once(key, f"monitor: send failed: {type(exc).__name__}: {exc}")

    def _post(self, address: str, body: dict[str, Any], timeout: float) -> None:
        headers = {"Content-Type": "application/json"}
        url = address
        parts = urllib.parse.urlsplit(address)
        if parts.username is not None:  # urllib would take "user:pass@host" for the host name: send Basic auth
            userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = response.read(65536)
        except Exception as exc:  # URLError, HTTPError, timeouts, a malformed address (ValueError), ...
            self._warn_once(address, f"monitor: POST to {redact(address)} failed: {type(exc).__name__}: {exc}")
            return
        # Feishu answers HTTP 200 with a non-zero "code" when it rejects a message (bad token, signature, rate limit).
        try:
            answer = json.loads(reply)
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("code", 0) not in (0, None):
            self._warn_once(address, f"monitor: {redact(address)} rejected the message: {answer}")

    def _warn_once(self, key: str, text: str) -> None:
        # One WARNING per destination: a dead endpoint must not flood the training log every step.
        if key in self._warned:
            return
        self._warned.add(key)
        for address in (self.webhook, self.light_monitor):
            if address:
                text = _scrub(text, address)
        self.log.warning("%s", text)
