"""Sandbox lifecycle through the control-plane API: create, list, timeout, connect, kill,
metrics, network policy."""

import http.server
import subprocess
import threading
import time
from datetime import datetime, timezone

import pytest
from e2b import (
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
)

from helpers import default_gateway, host_ipv4_addresses, probe, probe_exit, wait_until


def list_all(query: SandboxQuery):
    paginator = Sandbox.list(query=query)
    items = list(paginator.next_items())
    while paginator.has_next:
        items.extend(paginator.next_items())
    return items


def test_create_defaults_metadata_and_envs(new_sandbox, uniq):
    sbx = new_sandbox(metadata={"kiln-e2e": uniq}, envs={"KILN_E2E_VAR": "hello world"})
    assert sbx.is_running()

    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata.get("kiln-e2e") == uniq
    assert info.state == SandboxState.RUNNING
    assert info.cpu_count > 0 and info.memory_mb > 0
    assert info.end_at > info.started_at
    assert info.template_id  # the server's id for `base`

    # From inside: the base template, its default user and workdir, our env.
    assert "bookworm" in probe(sbx, "cat /etc/os-release")
    assert probe(sbx, "whoami") == "user"
    assert probe(sbx, "pwd") == "/home/user"
    assert probe(sbx, "echo $KILN_E2E_VAR") == "hello world"
    assert probe(sbx, "echo $E2B_SANDBOX_ID") == sbx.sandbox_id
    assert probe(sbx, "echo $E2B_SANDBOX") == "true"
    # The tools E2B's base template has.
    for tool in ("python3", "pip", "node", "npm", "git", "curl", "sudo"):
        assert probe_exit(sbx, f"command -v {tool}") == 0, tool


def test_list_filters_by_metadata_and_state(new_sandbox, uniq):
    a = new_sandbox(metadata={"kiln-e2e-list": uniq, "which": "a"})
    b = new_sandbox(metadata={"kiln-e2e-list": uniq, "which": "b"})
    other = new_sandbox(metadata={"kiln-e2e-list": "other-" + uniq})
    # Keys and values that need escaping (the SDK double-encodes the query).
    odd = new_sandbox(metadata={"kiln e2e/odd": f"x&y=z {uniq}"})

    found = list_all(SandboxQuery(metadata={"kiln-e2e-list": uniq}))
    assert {s.sandbox_id for s in found} == {a.sandbox_id, b.sandbox_id}
    by_id = {s.sandbox_id: s for s in found}
    assert by_id[a.sandbox_id].metadata["which"] == "a"
    assert by_id[b.sandbox_id].state == SandboxState.RUNNING

    both = list_all(SandboxQuery(metadata={"kiln-e2e-list": uniq, "which": "b"}))
    assert [s.sandbox_id for s in both] == [b.sandbox_id]

    running = list_all(
        SandboxQuery(metadata={"kiln-e2e-list": uniq}, state=[SandboxState.RUNNING])
    )
    assert {s.sandbox_id for s in running} == {a.sandbox_id, b.sandbox_id}
    paused = list_all(
        SandboxQuery(metadata={"kiln-e2e-list": uniq}, state=[SandboxState.PAUSED])
    )
    assert paused == []

    odd_found = list_all(SandboxQuery(metadata={"kiln e2e/odd": f"x&y=z {uniq}"}))
    assert [s.sandbox_id for s in odd_found] == [odd.sandbox_id]

    everything = {s.sandbox_id for s in list_all(SandboxQuery())}
    assert {a.sandbox_id, b.sandbox_id, other.sandbox_id, odd.sandbox_id} <= everything


def test_set_timeout_then_expiry(new_sandbox):
    sbx = new_sandbox(timeout=300)
    sbx.set_timeout(4)
    end_at = sbx.get_info().end_at
    left = (end_at - datetime.now(timezone.utc)).total_seconds()
    assert 0 < left <= 10, f"end_at {end_at} is {left:.1f}s away after set_timeout(4)"

    assert wait_until(lambda: not sbx.is_running(), timeout=30, interval=0.5), (
        "sandbox still running 30 s after a 4 s timeout"
    )
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert Sandbox.kill(sbx.sandbox_id) is False


def test_create_with_short_timeout_expires(new_sandbox):
    sbx = new_sandbox(timeout=3)
    assert probe(sbx, "echo alive") == "alive"
    assert wait_until(lambda: not sbx.is_running(), timeout=30, interval=0.5)


def test_connect_to_existing_sandbox(new_sandbox, uniq):
    sbx = new_sandbox()
    sbx.files.write(f"/tmp/connect-{uniq}", "written by the first handle")

    other = Sandbox.connect(sbx.sandbox_id)
    assert other.sandbox_id == sbx.sandbox_id
    assert probe(other, f"cat /tmp/connect-{uniq}") == "written by the first handle"
    assert other.commands.run("echo connected").stdout == "connected\n"

    with pytest.raises(NotFoundException):
        Sandbox.connect("doesnotexist0000000")


def test_kill(new_sandbox):
    sbx = new_sandbox()
    handle = sbx.commands.run("sleep 120", background=True, timeout=0)
    assert handle.pid > 0

    assert sbx.kill() is True
    assert not sbx.is_running()
    # envd calls for a killed sandbox fail (the proxy answers 502 → TimeoutException).
    with pytest.raises(SandboxException):
        sbx.commands.run("echo should-not-run")
    with pytest.raises(SandboxException):
        sbx.files.read("/etc/hostname")
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert Sandbox.kill(sbx.sandbox_id) is False
    ids = {s.sandbox_id for s in list_all(SandboxQuery())}
    assert sbx.sandbox_id not in ids


def test_get_metrics(new_sandbox):
    sbx = new_sandbox()
    probe(sbx, "head -c 2000000 /dev/urandom | sha256sum")
    time.sleep(1)
    metrics = sbx.get_metrics()
    assert isinstance(metrics, list)
    for m in metrics:
        assert m.cpu_count > 0
        assert 0 <= m.cpu_used_pct
        assert m.mem_total > 0 and 0 <= m.mem_used <= m.mem_total


def test_metrics_are_kept_as_history_a_range_selects_from(new_sandbox):
    import datetime

    sbx = new_sandbox()
    # The server samples every running sandbox every 5 s.
    assert wait_until(lambda: len(sbx.get_metrics()) >= 2, timeout=30)
    samples = sbx.get_metrics()
    stamps = [m.timestamp for m in samples]
    assert stamps == sorted(stamps)
    later = samples[-1].timestamp + datetime.timedelta(hours=1)
    assert sbx.get_metrics(start=later) == []
    assert len(sbx.get_metrics(end=samples[0].timestamp)) >= 1


PYPI = "https://pypi.org/simple/"


def test_no_internet_when_disallowed(new_sandbox):
    sbx = new_sandbox(allow_internet_access=False)
    assert probe_exit(sbx, f"curl -sS -m 10 -o /dev/null {PYPI}") != 0
    # Loopback still works inside the sandbox.
    loopback = (
        "python3 -c \"import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
        "s.listen(); socket.create_connection(s.getsockname()); print('ok')\""
    )
    assert probe(sbx, loopback) == "ok"


def test_internet_when_allowed(new_sandbox):
    sbx = new_sandbox(allow_internet_access=True)
    status = probe(sbx, f"curl -sS -m 30 -o /dev/null -w '%{{http_code}}' -I {PYPI}")
    assert status == "200", status
    out = probe(
        sbx,
        "pip download --no-deps --disable-pip-version-check -q -d /tmp/dl six==1.16.0 "
        "&& ls /tmp/dl",
        timeout=120,
    )
    assert "six-1.16.0" in out


def test_base_template_tools_work_online(new_sandbox):
    """What agents do first in a fresh sandbox: a venv with a package, and npm."""
    sbx = new_sandbox(allow_internet_access=True)
    out = probe(
        sbx,
        "python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q "
        "--disable-pip-version-check six==1.16.0 && /tmp/venv/bin/python -c "
        "'import six; print(six.__version__)'",
        timeout=120,
    )
    assert out.endswith("1.16.0")
    # pip without a venv works too (user install), as on E2B.
    probe(sbx, "pip install -q --disable-pip-version-check six==1.16.0", timeout=120)
    assert probe(sbx, "npm view left-pad@1.3.0 version", timeout=120) == "1.3.0"
    assert probe(sbx, "git --version").startswith("git version")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host-only")

    def log_message(self, *args):
        pass


def test_sandbox_cannot_reach_host(new_sandbox, server_port):
    """Neither the Kiln server's port nor any other host port is reachable from inside,
    on any of the host's addresses or the sandbox's gateway."""
    bait = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Hello)
    bait_port = bait.server_address[1]
    thread = threading.Thread(target=bait.serve_forever, daemon=True)
    thread.start()
    try:
        sbx = new_sandbox(allow_internet_access=True)
        targets = set(host_ipv4_addresses())
        gateway = default_gateway(sbx)
        if gateway:
            targets.add(gateway)
        assert targets, "no host address to test"
        # The bait answers from the host itself, so a failure inside means isolation.
        for ip in targets:
            assert subprocess_ok(f"curl -s -m 3 http://{ip}:{bait_port}/"), (
                f"bait server not reachable from the host at {ip}"
            )
        for ip in sorted(targets):
            for port in (server_port, bait_port):
                code = probe_exit(sbx, f"curl -sS -m 3 -o /dev/null http://{ip}:{port}/healthz")
                assert code != 0, f"sandbox reached host {ip}:{port}"
        # The sandbox's loopback is its own: the server is not there either.
        assert probe_exit(sbx, f"curl -sS -m 3 http://127.0.0.1:{server_port}/healthz") != 0
    finally:
        bait.shutdown()


def subprocess_ok(cmd: str) -> bool:
    return subprocess.run(cmd, shell=True, capture_output=True).returncode == 0


def test_list_orders_and_filters_by_start_time_and_template(new_sandbox, uniq):
    before = datetime.now(timezone.utc)
    first = new_sandbox(metadata={"kiln-e2e-order": uniq})
    time.sleep(0.05)
    second = new_sandbox(metadata={"kiln-e2e-order": uniq})
    query = SandboxQuery(metadata={"kiln-e2e-order": uniq}, started_after=before)

    def ids(order=None, query=query):
        paginator = Sandbox.list(query=query, order=order)
        items = list(paginator.next_items())
        while paginator.has_next:
            items.extend(paginator.next_items())
        return [s.sandbox_id for s in items]

    assert ids("asc") == [first.sandbox_id, second.sandbox_id]
    assert ids("desc") == [second.sandbox_id, first.sandbox_id]
    later = SandboxQuery(metadata={"kiln-e2e-order": uniq}, started_after=datetime.now(timezone.utc))
    assert ids(query=later) == []
    by_template = SandboxQuery(metadata={"kiln-e2e-order": uniq}, template=first.get_info().template_id)
    assert set(ids(query=by_template)) == {first.sandbox_id, second.sandbox_id}
    elsewhere = SandboxQuery(metadata={"kiln-e2e-order": uniq}, template="no-such-template")
    assert ids(query=elsewhere) == []


def test_base_has_python_as_well_as_python3(sbx):
    out = sbx.commands.run("python --version && python3 --version && pip --version")
    assert out.stdout.startswith("Python 3."), out.stdout


def test_logs_show_the_sandboxs_console_paged_and_filtered(new_sandbox):
    import os

    import httpx

    sbx = new_sandbox()
    sbx.commands.run("echo hi")

    def get(path, **params):
        resp = httpx.get(
            os.environ["E2B_API_URL"] + path,
            params=params,
            headers={"X-API-Key": os.environ["E2B_API_KEY"]},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        return resp.json()

    logs = get(f"/v2/sandboxes/{sbx.sandbox_id}/logs")["logs"]
    started = [e for e in logs if e["message"].startswith("process started")]
    assert started, logs
    assert started[0]["level"] == "info"
    assert started[0]["fields"]["logger"].startswith("kiln_envd")
    stamps = [e["timestamp"] for e in logs]
    assert stamps == sorted(stamps)
    assert get(f"/v2/sandboxes/{sbx.sandbox_id}/logs", level="error")["logs"] == [
        e for e in logs if e["level"] == "error"
    ]
    newest = get(f"/v2/sandboxes/{sbx.sandbox_id}/logs", direction="backward", limit=1)["logs"]
    assert newest == [logs[-1]]
    v1 = get(f"/sandboxes/{sbx.sandbox_id}/logs")
    assert [line["line"] for line in v1["logs"]] == [e["message"] for e in v1["logEntries"]]


def test_create_refuses_what_kiln_does_not_serve_naming_it():
    """E2B create options Kiln has no counterpart for are refused with 400 naming the
    field and what to do instead, never dropped (the caller would think it got them)."""
    asks = [
        ("volumeMounts", dict(volume_mounts={"/data": "kiln-e2e-volume"})),
        ("mcp", dict(mcp={"github": {"githubPersonalAccessToken": "x"}})),
    ]
    for field, kwargs in asks:
        with pytest.raises(SandboxException) as e:
            sbx = Sandbox.create(timeout=60, **kwargs)
            sbx.kill()
        assert "400" in str(e.value) and f"`{field}` is not supported by Kiln" in str(e.value), (field, e.value)
