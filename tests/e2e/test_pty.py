"""Interactive terminals: create, input, resize, kill."""

import threading

import pytest
from e2b import CommandExitException
from e2b.sandbox.commands.command_handle import PtySize

from helpers import wait_until


def test_pty_input_resize_and_exit(sbx):
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    output = bytearray()
    result = {}

    def reader():
        try:
            result["r"] = terminal.wait(on_pty=output.extend)
        except Exception as e:  # surfaced by the asserts below
            result["e"] = e

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sbx.pty.send_stdin(terminal.pid, b"echo pty-$((6*7)); tty; stty size\n")
    # Resize only after the first `stty size` ran (input is typed ahead otherwise).
    assert wait_until(lambda: b"24 80" in output, timeout=10), bytes(output)
    sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"stty size; echo $TERM; whoami\n")
    sbx.pty.send_stdin(terminal.pid, b"exit 0\n")
    thread.join(timeout=30)
    assert not thread.is_alive(), f"PTY did not exit; output so far: {bytes(output)!r}"
    assert "e" not in result, result.get("e")

    text = output.decode(errors="replace")
    assert "pty-42" in text
    assert "/dev/pts/" in text
    assert "24 80" in text
    assert "30 100" in text
    assert "xterm-256color" in text
    assert "\r\n" in text  # a real terminal (onlcr), not a pipe
    assert result["r"].exit_code == 0


def test_pty_kill(sbx):
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    assert terminal.pid in {p.pid for p in sbx.commands.list()}
    assert sbx.pty.kill(terminal.pid) is True
    with pytest.raises(CommandExitException) as exc:
        terminal.wait()
    assert exc.value.exit_code == -1
    assert sbx.pty.kill(terminal.pid) is False
