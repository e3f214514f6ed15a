"""Commands through envd's process service: foreground, background, streams, stdin,
signals, timeouts, env, cwd, user, list and reconnect."""

import time

import pytest
from e2b import CommandExitException, InvalidArgumentException, TimeoutException

from helpers import probe, probe_exit, wait_until


def count_procs(sbx, args: str) -> int:
    """Processes in the sandbox whose full command line is exactly `args`."""
    out = probe(sbx, f"ps -eo args= | grep -cxF '{args}' || true")
    return int(out or "0")


def test_foreground_stdout_stderr_exit_code(sbx):
    r = sbx.commands.run("echo out; echo err >&2; printf 'no newline'")
    assert r.exit_code == 0
    assert r.stdout == "out\nno newline"
    assert r.stderr == "err\n"
    assert r.error is None


def test_non_zero_exit_raises(sbx):
    with pytest.raises(CommandExitException) as exc:
        sbx.commands.run("echo partial; echo oops >&2; exit 3")
    assert exc.value.exit_code == 3
    assert exc.value.stdout == "partial\n"
    assert exc.value.stderr == "oops\n"
    assert exc.value.error == "exit status 3"


def test_large_and_unicode_output(sbx):
    r = sbx.commands.run("python3 -c \"print('ж€😀' * 50000)\"")
    assert r.stdout == "ж€😀" * 50000 + "\n"


def test_background_and_wait(sbx):
    started = time.monotonic()
    handle = sbx.commands.run("sleep 1; echo done", background=True)
    assert time.monotonic() - started < 1.0, "background run waited for the command"
    assert handle.pid > 0
    r = handle.wait()
    assert r.stdout == "done\n"
    assert r.exit_code == 0


def test_streaming_callbacks(sbx):
    chunks = []
    r = sbx.commands.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.4; done",
        on_stdout=lambda s: chunks.append(("out", s, time.monotonic())),
        on_stderr=lambda s: chunks.append(("err", s, time.monotonic())),
    )
    out = "".join(s for kind, s, _ in chunks if kind == "out")
    err = "".join(s for kind, s, _ in chunks if kind == "err")
    assert out == "o1\no2\no3\n" == r.stdout
    assert err == "e1\ne2\ne3\n" == r.stderr
    # Streamed as produced, not all at the end.
    first, last = chunks[0][2], chunks[-1][2]
    assert last - first >= 0.6, f"output arrived in one burst: {chunks}"


def test_stdin_send_and_close(sbx):
    handle = sbx.commands.run("cat; echo eof-seen", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello\n")
    sbx.commands.send_stdin(handle.pid, b"bytes \x00\xff\n")
    sbx.commands.close_stdin(handle.pid)
    r = handle.wait()
    assert r.stdout.startswith("hello\nbytes \x00")
    assert r.stdout.endswith("\neof-seen\n")


def test_stdin_defaults_to_dev_null(sbx):
    # Without stdin=True the command reads EOF at once instead of hanging.
    assert probe(sbx, "cat; echo after", timeout=10) == "after"


def test_kill_with_handle(sbx):
    handle = sbx.commands.run("sleep 61.5", background=True, timeout=0)
    assert wait_until(lambda: count_procs(sbx, "sleep 61.5") == 1, timeout=5)
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as exc:
        handle.wait()
    assert exc.value.exit_code == -1
    assert wait_until(lambda: count_procs(sbx, "sleep 61.5") == 0, timeout=5)


def test_commands_kill_by_pid(sbx):
    handle = sbx.commands.run("sleep 62.5", background=True, timeout=0)
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()
    assert wait_until(lambda: count_procs(sbx, "sleep 62.5") == 0, timeout=5)
    assert sbx.commands.kill(handle.pid) is False
    assert sbx.commands.kill(999_999) is False


def test_timeout_kills_command(sbx):
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 10.25", timeout=1)
    assert time.monotonic() - started < 8
    # The deadline is the process's lifetime inside the sandbox too.
    assert wait_until(lambda: count_procs(sbx, "sleep 10.25") == 0, timeout=5)


def test_timeout_raises_timeout_exception_and_kills(new_sandbox):
    # A sandbox of its own, so that `pgrep -x sleep` sees no other test's sleep.
    sbx = new_sandbox()
    for _ in range(3):  # the deadline's kill and the stream's end race inside envd
        with pytest.raises(TimeoutException):
            sbx.commands.run("sleep 30", timeout=2)
        assert wait_until(lambda: probe_exit(sbx, "pgrep -x sleep") == 1, timeout=5)


def test_background_timeout_kills_command(sbx):
    handle = sbx.commands.run("sleep 11.25", background=True, timeout=2)
    assert wait_until(lambda: count_procs(sbx, "sleep 11.25") == 1, timeout=1.5)
    # The stream ends with deadline_exceeded, as E2B's envd ends it.
    with pytest.raises(TimeoutException):
        handle.wait()
    assert wait_until(lambda: count_procs(sbx, "sleep 11.25") == 0, timeout=5)


def test_env_precedence(sbx):
    # sbx was created with KILN_E2E_SANDBOX_ENV and KILN_E2E_OVERRIDE=sandbox.
    r = sbx.commands.run(
        'echo "$KILN_E2E_SANDBOX_ENV|$KILN_E2E_OVERRIDE|$ONLY_CMD"',
        envs={"KILN_E2E_OVERRIDE": "command", "ONLY_CMD": "1"},
    )
    assert r.stdout == "from-create|command|1\n"
    # Per-command envs do not stick.
    assert probe(sbx, 'echo "$KILN_E2E_OVERRIDE|$ONLY_CMD"') == "sandbox|"
    assert probe(sbx, 'echo "$HOME|$USER"') == "/home/user|user"
    assert probe(sbx, 'echo "$HOME|$USER"', user="root") == "/root|root"


def test_cwd(sbx):
    assert probe(sbx, "pwd", cwd="/tmp") == "/tmp"
    assert probe(sbx, "pwd") == "/home/user"
    probe(sbx, "mkdir -p /home/user/sub/dir")
    assert probe(sbx, "pwd", cwd="sub/dir") == "/home/user/sub/dir"
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("pwd", cwd="/does/not/exist")


def test_sudo(sbx):
    """sudo as E2B's templates grant it (`user ALL=(ALL:ALL) NOPASSWD: ALL`). On gVisor,
    which ignores setuid bits, this is Kiln's sudo (kiln-sudo), so the same assertions
    check that it behaves like Debian's sudo on the jail."""
    assert probe(sbx, "sudo sh -c 'echo $(whoami) $SUDO_USER $SUDO_UID $HOME'") == (
        "root user 1000 /root"
    )
    assert probe(sbx, "echo piped | sudo cat") == "piped"
    assert probe(sbx, "sudo -u user whoami") == "user"
    assert probe(sbx, "sudo -i pwd") == "/root"
    assert probe_exit(sbx, "sudo -n sh -c 'exit 7'") == 7
    listing = probe(sbx, "sudo -n -l")
    assert "User user may run the following commands on" in listing, listing
    assert "NOPASSWD: ALL" in listing, listing
    assert probe(sbx, "sudo -n -l whoami") == "/usr/bin/whoami"
    # A user the rules do not name gets nothing.
    assert probe_exit(sbx, "sudo -u nobody sudo -n true") == 1
    assert probe_exit(sbx, "sudo -n nosuchcommand") == 1


def test_users(sbx):
    assert probe(sbx, "whoami") == "user"
    assert probe(sbx, "id -u; id -g") == "1000\n1000"
    assert probe(sbx, "whoami", user="root") == "root"
    assert probe(sbx, "id -u", user="root") == "0"
    # Passwordless sudo: sudo must still be setuid root after the template's uid shift.
    assert probe(sbx, "sudo -n whoami") == "root"
    # Files created by each user are owned by them.
    probe(sbx, "touch /tmp/by-user")
    probe(sbx, "touch /tmp/by-root", user="root")
    assert probe(sbx, "stat -c %U:%G /tmp/by-user /tmp/by-root") == "user:user\nroot:root"


def test_list(sbx):
    handle = sbx.commands.run("sleep 63.5", background=True, timeout=0)
    try:
        procs = {p.pid: p for p in sbx.commands.list()}
        assert handle.pid in procs
        p = procs[handle.pid]
        assert p.cmd == "/bin/bash"
        assert p.args == ["-l", "-c", "sleep 63.5"]
    finally:
        handle.kill()
    assert wait_until(
        lambda: handle.pid not in {p.pid for p in sbx.commands.list()}, timeout=5
    )


def test_connect_reattaches(sbx):
    handle = sbx.commands.run(
        "for i in $(seq 1 8); do echo tick$i; sleep 0.25; done; exit 4",
        background=True,
    )
    handle.disconnect()
    time.sleep(0.3)
    # Still running after the client went away.
    assert handle.pid in {p.pid for p in sbx.commands.list()}
    again = sbx.commands.connect(handle.pid)
    assert again.pid == handle.pid
    with pytest.raises(CommandExitException) as exc:
        again.wait()
    assert exc.value.exit_code == 4
    # Output produced while nobody listened may be dropped; the end is always seen.
    assert "tick8\n" in exc.value.stdout
