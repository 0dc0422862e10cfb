"""The terminal status line: redrawn below each log record on a terminal, absent in files and CI."""

import io
import logging

from internevo_jax.reporter import StatusLine, wants_status_line


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
