"""Helpers shared by the end-to-end tests (probes run inside a sandbox)."""

import re
import socket
import subprocess
import time
from typing import Callable, List, Optional

from e2b import CommandExitException, Sandbox


def probe(sbx: Sandbox, cmd: str, **kwargs) -> str:
    """Runs `cmd` in the sandbox and returns its stdout without the trailing newline."""
    return sbx.commands.run(cmd, **kwargs).stdout.rstrip("\n")


def probe_exit(sbx: Sandbox, cmd: str, **kwargs) -> int:
    """Runs `cmd` in the sandbox and returns its exit code (never raises for non-zero)."""
    try:
        return sbx.commands.run(cmd, **kwargs).exit_code
    except CommandExitException as e:
        return e.exit_code


# A background process whose shell variable (process memory) counts up; each value is
# renamed into place, so a reader never sees the file empty between a truncate and a write
# (nor a pause or checkpoint taken at that moment).
COUNTER = (
    "bash -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
    "mv /tmp/count.new /tmp/count; sleep 0.05; done'"
)


def start_counter(sbx: Sandbox) -> None:
    sbx.commands.run(COUNTER, background=True, timeout=0)


def read_counter(sbx: Sandbox) -> int:
    return int(probe(sbx, "cat /tmp/count"))


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def host_ipv4_addresses() -> List[str]:
    """The host's own IPv4 addresses, loopback excluded."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addrs = []
    for line in out.splitlines():
        m = re.search(r"\sinet\s+(\d+\.\d+\.\d+\.\d+)/", line)
        if m and not m.group(1).startswith("127."):
            addrs.append(m.group(1))
    return addrs


def default_gateway(sbx: Sandbox) -> Optional[str]:
    """The sandbox's default gateway (the host side of its veth), if it has one."""
    out = probe(sbx, "ip -4 route show default || true")
    m = re.search(r"default via (\d+\.\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if `proc` has not exited within `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
