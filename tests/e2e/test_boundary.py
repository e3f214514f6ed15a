"""The host-guest boundary, attacked the way an adversary would: root in a sandbox who
rewrites what the host reads from the sandbox's directory, and a stranger who knows only
a sandbox id. Each test is named in docs/threat-model.md. CI runs this file on the jail
and on gVisor.

Privilege tier: root on the host (the tests listen on host Unix sockets and read the
host's view of the sandbox)."""

import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import probe, probe_exit

ENVD_PORT = "49983"


def envd_request(method: str, path: str, sandbox_id: str, token=None, body: str = "{}"):
    headers = {
        "Content-Type": "application/json",
        "Connect-Protocol-Version": "1",
        "E2b-Sandbox-Id": sandbox_id,
        "E2b-Sandbox-Port": ENVD_PORT,
    }
    if token is not None:
        headers["X-Access-Token"] = token
    url = os.environ["E2B_SANDBOX_URL"].rstrip("/") + path
    return httpx.request(method, url, headers=headers, content=body, timeout=30)


class HostSocket:
    """A Unix socket on the host standing in for Docker's: counts who connects."""

    def __init__(self, path: Path):
        self.path = path
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npwned!")
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join(timeout=2)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def test_a_link_planted_at_envds_socket_does_not_reach_a_host_socket(new_sandbox, uniq):
    """Attack: as root in the sandbox, replace /run/kiln/envd.sock by a symlink to a
    host socket; the server must not send the next proxied request there."""
    host = HostSocket(Path(f"/tmp/kiln-e2e-host-{uniq}.sock"))
    try:
        sbx = new_sandbox()
        token = sbx._envd_access_token
        assert envd_request("POST", "/process.Process/List", sbx.sandbox_id, token).status_code == 200
        # One command: after it the SDK's own channel is gone too.
        sbx.commands.run(
            f"cd /run/kiln && mv envd.sock envd.sock.moved && ln -s {host.path} envd.sock",
            user="root",
            background=True,
            timeout=0,
        )
        deadline = time.monotonic() + 10
        statuses = []
        while time.monotonic() < deadline:
            r = envd_request("POST", "/process.Process/List", sbx.sandbox_id, token)
            statuses.append(r.status_code)
            assert r.text != "pwned!", "the server forwarded a request to the host socket"
            if r.status_code == 502:
                break
            time.sleep(0.2)
        assert statuses[-1] == 502, statuses
        assert "envd.sock" not in r.text and "/var/" not in r.text, r.text
        assert host.connections == 0, "the server connected to the host socket"
    finally:
        host.close()


def test_a_socket_the_guest_binds_at_envds_path_is_only_ever_the_guest(new_sandbox):
    """What root in the sandbox can still do: bind a socket of its own at envd's path.
    The server then talks to the guest (which it already controls), never to the host:
    the answer comes from the guest's socket."""
    sbx = new_sandbox()
    token = sbx._envd_access_token
    fake = (
        "import os, socket\n"
        "os.rename('/run/kiln/envd.sock', '/run/kiln/envd.real')\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('/run/kiln/envd.sock'); s.listen(1)\n"
        "c, _ = s.accept(); c.recv(65536)\n"
        "c.sendall(b'HTTP/1.1 418 I am the guest\\r\\nContent-Length: 5\\r\\n\\r\\nguest')\n"
        "c.close()\n"
    )
    sbx.files.write("/tmp/fake_envd.py", fake)
    sbx.commands.run("python3 /tmp/fake_envd.py", user="root", background=True, timeout=0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = envd_request("POST", "/process.Process/List", sbx.sandbox_id, token)
        if r.status_code == 418:
            assert r.text == "guest"
            return
        time.sleep(0.2)
    pytest.fail(f"the guest's own socket was not the one answering: {r.status_code} {r.text}")


@pytest.mark.parametrize("path", ["/init", "//init", "/init/", "/%69nit", "/INIT"])
def test_init_through_the_proxy_is_refused_and_the_token_holds(new_sandbox, path):
    """Attack: a stranger who knows a sandbox id posts envd's /init through the proxy
    to drop the access token, then lists processes without it."""
    sbx = new_sandbox()
    token = sbx._envd_access_token
    assert token
    r = envd_request("POST", path, sbx.sandbox_id, body='{"accessToken": ""}')
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.json()["code"] == 403
    assert envd_request("POST", "/process.Process/List", sbx.sandbox_id).status_code == 401
    # The owner's channel still works.
    assert probe(sbx, "echo ok") == "ok"


def test_kilns_own_envd_routes_are_not_reachable_through_the_proxy(new_sandbox):
    sbx = new_sandbox()
    sbx.commands.run("python3 -m http.server 8123 --bind 127.0.0.1", background=True, timeout=0)
    for path in ["/_kiln/tunnel/8123", "//_kiln/tunnel/8123", "/%5fkiln/tunnel/8123"]:
        r = envd_request("GET", path, sbx.sandbox_id, token=sbx._envd_access_token)
        assert r.status_code == 403, (path, r.status_code, r.text)


def test_a_hostile_envd_pid_file_neither_hangs_nor_exhausts_the_server(new_sandbox):
    """Attack: root in the sandbox replaces /run/kiln/envd.pid (read by the host at
    pause on gVisor) by a link to /dev/zero. Pause must still end (falling back to a
    pause that keeps memory if it cannot quiesce envd), the server keeps answering,
    and the sandbox resumes."""
    sbx = new_sandbox()
    sbx.commands.run(
        "rm -f /run/kiln/envd.pid && ln -s /dev/zero /run/kiln/envd.pid", user="root"
    )
    sbx.files.write("/home/user/kept", "kept")
    sbx.pause()
    health = httpx.get(os.environ["E2B_API_URL"].rstrip("/") + "/healthz", timeout=10)
    assert health.status_code == 200
    sbx.connect()
    assert sbx.files.read("/home/user/kept") == "kept"
    assert probe_exit(sbx, "true") == 0


# --- template authors -------------------------------------------------------------------

API = os.environ.get("E2B_API_URL", "").rstrip("/")


def api(method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"X-API-KEY": os.environ["E2B_API_KEY"]}
    return httpx.request(method, API + path, headers=headers, timeout=60, **kwargs)


def raw_build(name: str, steps, files: dict) -> dict:
    """The Template SDK's REST sequence by hand, so the test controls the tar bytes:
    create, upload each COPY context (`files`: filesHash -> tar bytes), start, poll."""
    r = api("POST", "/v3/templates", json={"name": name, "cpuCount": 1, "memoryMB": 512})
    assert r.status_code == 202, r.text
    tid, bid = r.json()["templateID"], r.json()["buildID"]
    for files_hash, tar_bytes in files.items():
        r = api("GET", f"/templates/{tid}/files/{files_hash}")
        assert r.status_code == 201, r.text
        url = r.json()["url"]
        if not url.startswith("http"):
            url = API + url
        up = httpx.put(url, content=tar_bytes, timeout=60)
        assert up.status_code < 300, up.text
    body = {"fromTemplate": "base", "force": False, "steps": steps}
    r = api("POST", f"/v2/templates/{tid}/builds/{bid}", json=body)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = api("GET", f"/templates/{tid}/builds/{bid}/status?logsOffset=0&limit=100")
        status = r.json()
        if status["status"] in ("ready", "error"):
            return status
        time.sleep(0.5)
    pytest.fail(f"build {bid} did not finish: {status}")


def tar_of(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_copy_through_a_context_symlink_to_root_reads_no_host_file(uniq, new_sandbox):
    """Attack: a COPY context holding `s -> /` and `COPY s/etc/kiln-e2e-secret /x`
    would copy a host file into the template if the host resolved the source."""
    secret = Path(f"/etc/kiln-e2e-secret-{uniq}")
    secret.write_text("host secret\n")
    name = f"kiln-e2e-copy-{uniq}"
    try:
        link = tarfile.TarInfo("s")
        link.type = tarfile.SYMTYPE
        link.linkname = "/"
        files_hash = "a" * 63 + "1"
        status = raw_build(
            name,
            [{"type": "COPY", "args": [f"s/etc/{secret.name}", "/x", "", ""],
              "filesHash": files_hash, "force": False}],
            {files_hash: tar_of([(link, None)])},
        )
        if status["status"] == "ready":
            # Resolved inside the context (Docker's rule): whatever landed is not the host's.
            sbx = new_sandbox(template=name)
            assert "host secret" not in probe(sbx, "cat /x 2>/dev/null || true", user="root")
        else:
            assert "host secret" not in json.dumps(status)
    finally:
        secret.unlink()
        api("DELETE", f"/templates/{name}")


def test_copy_context_with_a_device_node_is_refused(uniq):
    dev = tarfile.TarInfo("mem")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 1
    name = f"kiln-e2e-dev-{uniq}"
    files_hash = "b" * 63 + "2"
    try:
        status = raw_build(
            name,
            [{"type": "COPY", "args": ["mem", "/mem", "", ""], "filesHash": files_hash,
              "force": False}],
            {files_hash: tar_of([(dev, None)])},
        )
        assert status["status"] == "error", status
        assert "device" in json.dumps(status).lower(), status
    finally:
        api("DELETE", f"/templates/{name}")


def test_a_run_step_that_leaves_a_symlink_swapper_does_not_leak_host_files(uniq, new_sandbox):
    """Attack: a RUN step starts a background process that keeps swapping a directory
    of the step's changes for a symlink to / while the host turns them into a layer."""
    secret = Path(f"/etc/kiln-e2e-swap-{uniq}")
    secret.write_text("host secret\n")
    name = f"kiln-e2e-swap-{uniq}"
    swapper = (
        "mkdir -p /opt/d && for i in $(seq 200); do echo $i > /opt/d/f$i; done; "
        "nohup sh -c 'while :; do mv /opt/d /opt/d.real 2>/dev/null; ln -sfn / /opt/d; "
        "rm -f /opt/d; mv /opt/d.real /opt/d 2>/dev/null; done' >/dev/null 2>&1 &"
    )
    try:
        status = raw_build(name, [{"type": "RUN", "args": [swapper, "root"], "force": False}], {})
        if status["status"] == "ready":
            sbx = new_sandbox(template=name)
            found = probe(sbx, f"cat /opt/d/etc/{secret.name} /opt/d.real/etc/{secret.name} "
                               "2>/dev/null || true", user="root")
            assert "host secret" not in found
            assert probe_exit(sbx, f"test -e /opt/d/etc/{secret.name}", user="root") != 0
    finally:
        secret.unlink()
        api("DELETE", f"/templates/{name}")


# --- egress ----------------------------------------------------------------------------

@pytest.fixture
def private_listener(uniq):
    """An HTTP server on a private address (10.213.x.1) in a network namespace this test
    makes, routed from the host: never an address outside this machine."""
    ns = f"kiln-e2e-{uniq[:6]}"
    host_if, ns_if = f"kp{uniq[:6]}", f"kq{uniq[:6]}"
    octet = int(uniq[:2], 16) % 200 + 20
    net = f"10.213.{octet}"

    def sh(*args, check=True):
        return subprocess.run(args, check=check, capture_output=True, text=True)

    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{net}.2/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{net}.1/24", "dev", ns_if)
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-m", "http.server", "8080", "--bind", f"{net}.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        url = f"http://{net}.1:8080/"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sh("curl", "-s", "-o", "/dev/null", "-m", "1", url, check=False).returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the test's own private listener did not come up")
        yield url
    finally:
        if server:
            server.kill()
            server.wait()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_egress_to_a_private_address_is_denied(new_sandbox, private_listener):
    """A sandbox with internet access cannot reach a private (RFC 1918) address, here a
    listener the test serves from its own network namespace; the host can."""
    sbx = new_sandbox()
    code = probe_exit(sbx, f"curl -s -o /dev/null -m 5 {private_listener}")
    assert code != 0, "the sandbox reached a private address"


# --- disk ------------------------------------------------------------------------------

def test_writing_past_the_disk_cap_is_enospc_and_spares_the_host(new_sandbox):
    """Attack: `dd` in a sandbox (into its root filesystem, and into its console, which
    the host keeps in a file) until something gives. The sandbox's own disk fills
    (ENOSPC inside); the data directory and a neighbour do not notice."""
    cap_mb = int(os.environ.get("KILN_SANDBOX_DISK_MB", "1024"))
    data_dir = os.environ.get("KILN_E2E_DATA_DIR", "/var/lib/kiln-e2e")
    a = new_sandbox()
    b = new_sandbox()
    free_before = shutil.disk_usage(data_dir).free
    out = probe(
        a,
        f"dd if=/dev/zero of=/var/tmp/fill bs=1M count={cap_mb + 100} 2>&1; echo exit=$?",
        user="root",
        timeout=300,
    )
    assert "No space left on device" in out, out
    assert out.rstrip().endswith("exit=1"), out
    grown = free_before - shutil.disk_usage(data_dir).free
    assert grown < (cap_mb + 64) * 2**20, f"the data directory lost {grown >> 20} MiB"
    # The console is on the same disk: writing to it fills nothing else either.
    out = probe(
        a,
        f"dd if=/dev/zero of=/proc/1/fd/1 bs=1M count={cap_mb + 100} 2>&1; echo exit=$?",
        user="root",
        timeout=300,
    )
    assert "exit=0" not in out or "No space left" in out, out
    grown = free_before - shutil.disk_usage(data_dir).free
    assert grown < (cap_mb + 64) * 2**20, f"the data directory lost {grown >> 20} MiB"
    # The neighbour writes as before.
    assert probe(b, "head -c 10M /dev/zero > /var/tmp/ok && echo written", user="root") == "written"
    # And the full sandbox recovers once its files are gone.
    probe(a, "rm -f /var/tmp/fill", user="root")
    assert probe(a, "echo fine > /var/tmp/small && cat /var/tmp/small", user="root") == "fine"


# --- per-user kernel limits ------------------------------------------------------------

INOTIFY_HOG = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
# Opened first: once the loop has taken every descriptor the fd limit allows (gVisor,
# which has no per-user inotify limit), nothing could be opened after it.
ready = open("/tmp/hog.ready.new", "w")
fds = []
# Far past the host's per-user limit (128 instances by default), and quick to reach
# under gVisor too, whose Sentry has no such limit (only the fd limit).
while len(fds) < 4096:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print(len(fds), os.strerror(ctypes.get_errno()), flush=True)
ready.write(str(len(fds)))
ready.close()
os.rename("/tmp/hog.ready.new", "/tmp/hog.ready")
time.sleep(600)
"""


def test_inotify_exhaustion_in_one_sandbox_leaves_a_neighbours_watch_working(new_sandbox):
    """Attack: a sandbox takes every inotify instance the kernel lets it have and holds
    them. Per-user limits are charged to the owner of each sandbox's user namespace,
    a host id of its own, so a neighbour's `watch_dir` still works."""
    a = new_sandbox()
    b = new_sandbox()
    a.files.write("/tmp/hog.py", INOTIFY_HOG)
    a.commands.run("python3 /tmp/hog.py", user="root", background=True, timeout=0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if probe_exit(a, "test -s /tmp/hog.ready") == 0:
            break
        time.sleep(0.5)
    held = probe(a, "cat /tmp/hog.ready 2>/dev/null || true")
    assert held.isdigit() and int(held) > 0, f"the hog did not report: {held!r}"
    # The neighbour can still watch a directory and sees an event.
    b.files.make_dir("/home/user/watched")
    handle = b.files.watch_dir("/home/user/watched")
    try:
        b.files.write("/home/user/watched/new.txt", "x")
        deadline = time.monotonic() + 10
        events = []
        while time.monotonic() < deadline and not events:
            events = handle.get_new_events()
            time.sleep(0.2)
        assert any(e.name == "new.txt" for e in events), events
    finally:
        handle.stop()
