"""The isolation promises, checked through the SDK on whichever runtime the server runs
(CI runs this file on the jail and on gVisor). Host network services and the server's
port: `test_sandbox.py::test_sandbox_cannot_reach_host`.

Privilege tier: root on the host (the last test inspects the host's processes, mounts,
cgroups and the data directory)."""

import glob
import os
import time
from pathlib import Path

import pytest
from e2b import Sandbox

from helpers import probe, probe_exit, wait_until

# What /dev may hold. gVisor adds its own emulated `fuse` and `net/tun` (Sentry
# devices, not the host's; both need capabilities the sandbox lacks to be used).
DEV_ALLOWED = {
    "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
    "tty", "urandom", "zero", "fuse", "net",
}

PRIVILEGED = r"""
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def err(ret):
    return "ok" if ret != -1 else errno.errorcode.get(ctypes.get_errno(), "?")
out = {}
out["init_module"] = err(libc.syscall(175, None, 0, b""))
out["finit_module"] = err(libc.syscall(313, 0, b"", 0))
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
out["ptrace_host_pid"] = err(libc.ptrace(16, int(sys.argv[1]), None, None))
for name, args in (("raw_socket", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("packet_socket", (socket.AF_PACKET, socket.SOCK_RAW, 0))):
    try:
        socket.socket(*args).close()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, "?")
print(" ".join(f"{k}={v}" for k, v in out.items()))
"""


def test_host_and_other_sandboxes_are_invisible(new_sandbox, uniq):
    host_marker = Path(f"/tmp/kiln-e2e-host-{uniq}")
    host_marker.write_text("host secret")
    try:
        a = new_sandbox()
        b = new_sandbox()
        # Host files: not at the same path, and not the server's data directory.
        assert probe_exit(a, f"test -e {host_marker}", user="root") != 0
        data_dir = os.environ.get("KILN_E2E_DATA_DIR", "/var/lib/kiln-e2e")
        assert probe_exit(a, f"test -e {data_dir}/kiln.db", user="root") != 0
        # Host processes: only the sandbox's own few pids, and not this test's.
        pids = probe(a, "ls /proc | grep -c '^[0-9]'", user="root")
        assert int(pids) < 30, f"{pids} processes visible"
        own = os.getpid()
        assert "pytest" not in probe(a, f"cat /proc/{own}/cmdline 2>/dev/null || true", user="root")
        # Another sandbox's files and processes.
        a.files.write(f"/home/user/secret-{uniq}", "a's secret")
        a.commands.run(f"sleep 4{len(uniq)}7 &", background=True)
        assert probe_exit(b, f"test -e /home/user/secret-{uniq}", user="root") != 0
        assert f"sleep 4{len(uniq)}7" not in probe(b, "ps -eo args", user="root")
        assert f"sleep 4{len(uniq)}7" in probe(a, "ps -eo args", user="root")
    finally:
        host_marker.unlink()


def test_privileged_operations_are_refused_even_to_root(sbx):
    out = probe(sbx, f"python3 -c '{PRIVILEGED}' {os.getpid()}", user="root")
    got = dict(kv.split("=") for kv in out.split())
    assert got["init_module"] in ("EPERM", "ENOSYS"), out
    assert got["finit_module"] in ("EPERM", "ENOSYS"), out
    # The host's pids do not exist inside.
    assert got["ptrace_host_pid"] in ("ESRCH", "EPERM"), out
    assert got["raw_socket"] in ("EPERM", "EACCES", "EAFNOSUPPORT"), out
    assert got["packet_socket"] in ("EPERM", "EACCES", "EAFNOSUPPORT"), out
    assert probe_exit(sbx, "mount -t tmpfs none /mnt", user="root") != 0
    assert probe_exit(sbx, "mount --bind / /mnt", user="root") != 0
    # Devices: the minimal set, no block devices, nothing that reaches host hardware.
    devs = set(probe(sbx, "ls /dev", user="root").split())
    assert devs <= DEV_ALLOWED, f"unexpected devices: {devs - DEV_ALLOWED}"
    assert probe(sbx, "find /dev -type b", user="root") == ""
    for dev in ("mem", "kmem", "port", "kmsg", "kvm", "sda", "vda"):
        assert probe_exit(sbx, f"test -e /dev/{dev}", user="root") != 0, dev


ECHO = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(3)
s.sendto(bytes([8, 0, 0, 0, 0, 0, 0, 1]) + b"kiln", ("127.0.0.1", 0))
reply, _ = s.recvfrom(64)
print("echo reply" if reply[0] == 0 and reply.endswith(b"kiln") else reply)
"""


def test_icmp_echo_without_raw_sockets(sbx):
    # What `ping` uses when it has no CAP_NET_RAW (no sandbox has it): ICMP echo
    # sockets, open to every user of the sandbox.
    assert probe(sbx, f"python3 -c '{ECHO}'") == "echo reply"


def _still_serving(new_sandbox) -> None:
    """The host and other sandboxes do not notice a bomb next door."""
    other = new_sandbox()
    assert probe(other, "echo fine") == "fine"


def test_memory_bomb_is_contained(new_sandbox):
    sbx = new_sandbox()
    bomb = (
        "python3 -c 'b = bytearray(4096 << 20); "
        'b[::4096] = b"x" * len(b[::4096])\''
    )
    try:
        # The allocation cannot succeed. The jail's OOM killer ends the command and the
        # sandbox lives on; under gVisor the host kills the whole sandbox (its Sentry).
        assert probe_exit(sbx, bomb, timeout=60) != 0
        survived = True
    except Exception:
        survived = False
    if survived and wait_until(lambda: sbx.is_running(), 2):
        assert probe(sbx, "echo alive") == "alive"
    else:
        assert wait_until(lambda: not sbx.is_running(), 30), "a dead sandbox is still listed"
    _still_serving(new_sandbox)


def test_fork_bomb_is_contained(new_sandbox):
    sbx = new_sandbox()
    try:
        sbx.commands.run(
            "timeout 10 bash -c 'b() { b | b & }; b' >/dev/null 2>&1; true", timeout=60
        )
    except Exception:
        pass  # gVisor: the sandbox may die of it
    _still_serving(new_sandbox)
    sbx.kill()
    assert wait_until(lambda: not sbx.is_running(), 30)


def test_a_sandbox_killed_mid_command_leaves_nothing_on_the_host(new_sandbox):
    sbx = new_sandbox(allow_internet_access=True)
    sid = sbx.sandbox_id
    sbx.commands.run("sleep 600", background=True)
    sbx.commands.run("sh -c 'while :; do :; done'", background=True)
    sbx.commands.run("dd if=/dev/zero of=/tmp/fill bs=1M count=20 && sleep 600", background=True)
    time.sleep(0.5)
    sbx.kill()

    data_dir = Path(os.environ.get("KILN_E2E_DATA_DIR", "/var/lib/kiln-e2e")).resolve()

    def leftovers() -> list:
        found = []
        for state in ("sandboxes", "sandboxes-gvisor"):
            if (data_dir / state / sid).exists():
                found.append(f"directory {data_dir / state / sid}")
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if sid in line:
                found.append(f"mount {line.split()[4]}")
        found += [f"cgroup {p}" for p in glob.glob(f"/sys/fs/cgroup/*/kiln/{sid}")]
        found += [f"cgroup {p}" for p in glob.glob(f"/sys/fs/cgroup/unified/kiln/{sid}")]
        if Path(f"/run/netns/kiln-{sid}").exists():
            found.append(f"netns kiln-{sid}")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                root = os.readlink(proc / "root")
            except OSError:
                continue
            if sid in cmdline or sid in root:
                found.append(f"process {proc.name}: {cmdline[:100]}")
        return found

    assert wait_until(lambda: not leftovers(), 15), leftovers()
    with pytest.raises(Exception):
        Sandbox.connect(sid)
