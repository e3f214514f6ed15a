"""Pause and resume with the SDK: `sbx.pause()` then `Sandbox.connect(id)`.

On the jail runtime a pause freezes the sandbox's cgroup; on gVisor it checkpoints the
sandbox to disk and the resume restores it. Either way processes stop where they are and
keep their memory, so a counting background process goes on from where it stood.
"""

import os
import time
from datetime import datetime, timezone

import httpx
from e2b import Sandbox, SandboxQuery, SandboxState

from helpers import probe_exit, read_counter, start_counter, wait_until


def test_pause_keeps_processes_and_memory(new_sandbox):
    sbx = new_sandbox()
    # A shell variable (process memory) counts; the file only reports it.
    start_counter(sbx)
    time.sleep(0.5)
    assert read_counter(sbx) > 0

    assert sbx.pause() is True
    assert sbx.pause() is False, "a second pause reports 'already paused'"
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.state == SandboxState.PAUSED
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in paused]

    resumed = Sandbox.connect(sbx.sandbox_id)
    at_resume = read_counter(resumed)
    time.sleep(0.5)
    after = read_counter(resumed)
    assert after > at_resume, "the counting process did not go on after resume"
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    assert resumed.commands.run("echo alive").stdout.strip() == "alive"


def test_timeout_pauses_when_the_create_asked_for_it(new_sandbox):
    """`lifecycle={"on_timeout": "pause"}` (the API's autoPause): at its deadline the
    sandbox is paused, not killed, and `Sandbox.connect` picks it up with its process
    and memory."""
    sbx = new_sandbox(timeout=6, lifecycle={"on_timeout": "pause"})
    start_counter(sbx)
    sbx.files.write("/home/user/note.txt", "kept")
    assert wait_until(
        lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, 30
    ), "the sandbox was not paused at its deadline"
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
    at_resume = read_counter(resumed)
    time.sleep(0.5)
    assert read_counter(resumed) > at_resume, "the counting process did not go on"
    assert resumed.files.read("/home/user/note.txt") == "kept"


def _port(sbx, port: int, path: str) -> httpx.Response:
    """A request to one of the sandbox's ports through Kiln's proxy, as any client."""
    return httpx.get(
        f"{os.environ['E2B_API_URL'].rstrip('/')}{path}",
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)},
        timeout=120,
    )


def test_traffic_wakes_a_sandbox_created_with_auto_resume(new_sandbox):
    """`lifecycle={"on_timeout": "pause", "auto_resume": True}`: a paused sandbox wakes
    when a request reaches one of its ports, or envd (an SDK call), with the timeout it
    was created with starting again; its processes go on. `get_info` shows the
    lifecycle."""
    sbx = new_sandbox(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
    assert Sandbox.get_info(sbx.sandbox_id).lifecycle == {"on_timeout": "pause", "auto_resume": True}
    sbx.files.write("/home/user/www/hello.txt", "awake")
    sbx.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 --directory /home/user/www",
                     background=True, timeout=0)
    assert wait_until(lambda: _port(sbx, 8000, "/hello.txt").status_code == 200, 30)
    start_counter(sbx)

    assert sbx.pause() is True
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    r = _port(sbx, 8000, "/hello.txt")
    assert (r.status_code, r.text) == (200, "awake")
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.state == SandboxState.RUNNING
    left = (info.end_at - datetime.now(timezone.utc)).total_seconds()
    assert 60 < left <= 121, f"the create's 120 s did not start again: {left:.0f} s left"

    assert sbx.pause() is True
    assert sbx.commands.run("echo woke").stdout.strip() == "woke"
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    before = read_counter(sbx)
    time.sleep(0.5)
    assert read_counter(sbx) > before, "the counting process did not go on after the wake"


def test_without_auto_resume_traffic_leaves_a_paused_sandbox_paused(new_sandbox):
    """A sandbox paused without auto-resume answers its traffic 502 ("paused") and
    stays paused; a lifecycle E2B refuses is refused here too (400)."""
    sbx = new_sandbox(timeout=120, lifecycle={"on_timeout": "pause"})
    assert Sandbox.get_info(sbx.sandbox_id).lifecycle == {"on_timeout": "pause", "auto_resume": False}
    assert sbx.pause() is True
    r = _port(sbx, 8000, "/")
    assert r.status_code == 502 and "paused" in r.text, r.text
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED

    api = os.environ["E2B_API_URL"].rstrip("/")
    key = {"X-API-KEY": os.environ["E2B_API_KEY"]}
    for body, why in [
        ({"templateID": "base", "autoResume": {"enabled": True}}, "autoPause"),
        ({"templateID": "base", "autoPause": True, "autoPauseMemory": False,
          "autoResume": {"enabled": True}}, "filesystem-only"),
    ]:
        r = httpx.post(f"{api}/sandboxes", json=body, headers=key, timeout=60)
        assert r.status_code == 400 and why in r.text, (body, r.status_code, r.text)


def test_a_stranger_cannot_wake_an_auto_resume_sandbox(new_sandbox):
    """Only traffic that would reach the running sandbox wakes it: a private port
    without the traffic token is refused (403) and envd without the sandbox's access
    token gets "paused" (502), and the sandbox stays paused; with the token it wakes."""
    sbx = new_sandbox(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True},
                      network={"allow_public_traffic": False})
    token = sbx.traffic_access_token
    assert token
    sbx.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp",
                     background=True, timeout=0)
    assert wait_until(lambda: probe_exit(sbx, "curl -sf -o /dev/null 127.0.0.1:8000/") == 0, 30)
    assert sbx.pause() is True
    api = os.environ["E2B_API_URL"].rstrip("/")
    route = {"E2b-Sandbox-Id": sbx.sandbox_id}
    r = httpx.get(f"{api}/", headers={**route, "E2b-Sandbox-Port": "8000"}, timeout=60)
    assert r.status_code == 403, r.text
    r = httpx.get(f"{api}/files", params={"path": "/etc/hostname"},
                  headers={**route, "E2b-Sandbox-Port": "49983"}, timeout=60)
    assert r.status_code == 502 and "paused" in r.text, r.text
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    r = httpx.get(f"{api}/", headers={**route, "E2b-Sandbox-Port": "8000",
                                      "e2b-traffic-access-token": token}, timeout=120)
    assert r.status_code == 200, r.text
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
