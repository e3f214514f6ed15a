"""Work requested over NATS (issue 16), against the running server and the NATS server
run.sh starts for it (`KILN_NATS_URL`): a spell run and a desktop request each get their
answers on the seed's subjects, and a malformed message gets `failed` naming the problem.

The desktop request needs the `desktop` built-in: it runs when the server serves it and
fails, never skips, when `KILN_BUILTIN_TEMPLATES` names it (as CI's does)."""

import asyncio
import json
import os
import uuid

import httpx
import nats
import pytest
from e2b import Sandbox

from test_desktop import proxy_address, rfb_security_types

NATS_URL = os.environ.get("KILN_NATS_URL", "")


async def ask(subject: str, payload: bytes, answers, timeout: float, request_id=None):
    """Publish `payload` on `subject` and return the first message on one of `answers`
    whose request_id matches (the decoded JSON and its subject)."""
    nc = await nats.connect(NATS_URL)
    try:
        queue: asyncio.Queue = asyncio.Queue()

        async def got(msg):
            await queue.put(msg)

        for a in answers:
            await nc.subscribe(a, cb=got)
        await nc.flush()
        await nc.publish(subject, payload)
        await nc.flush()
        while True:
            msg = await asyncio.wait_for(queue.get(), timeout)
            body = json.loads(msg.data)
            if request_id is None or body.get("request_id") == request_id:
                return msg.subject, body
    finally:
        await nc.drain()


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def needs_nats():
    assert NATS_URL, "KILN_NATS_URL is not set: run the suite through tests/e2e/run.sh"


def test_a_spell_requested_over_nats_completes_with_its_result():
    rid = uuid.uuid4().hex
    req = {"request_id": rid, "spell": "run-python", "agent_id": "e2e",
           "args": {"code": "print(6 * 7)"}}
    subject, body = run(ask("e2b.spell.execute.v1", json.dumps(req).encode(),
                            ["e2b.spell.completed.v1", "e2b.spell.failed.v1"], 180, rid))
    assert subject == "e2b.spell.completed.v1", body
    assert body["agent_id"] == "e2e" and body["spell"] == "run-python"
    assert body["result"]["stdout"] == "42\n" and body["result"]["exitCode"] == 0


def test_bad_and_malformed_requests_get_failed_naming_the_problem():
    rid = uuid.uuid4().hex
    req = {"request_id": rid, "spell": "run-python", "args": {"code": 5}}
    subject, body = run(ask("e2b.spell.execute.v1", json.dumps(req).encode(),
                            ["e2b.spell.completed.v1", "e2b.spell.failed.v1"], 60, rid))
    assert subject == "e2b.spell.failed.v1"
    assert "must be a string" in body["error"]

    rid = uuid.uuid4().hex
    broken = json.dumps({"request_id": rid, "spell": ["not", "a", "name"]}).encode()
    subject, body = run(ask("e2b.spell.execute.v1", broken, ["e2b.spell.failed.v1"], 60, rid))
    assert "malformed e2b.spell.execute.v1 message" in body["error"]

    rid = uuid.uuid4().hex
    broken = json.dumps({"request_id": rid, "duration": "long"}).encode()
    subject, body = run(ask("e2b.desktop.request.v1", broken, ["e2b.desktop.failed.v1"], 60, rid))
    assert "malformed e2b.desktop.request.v1 message" in body["error"]


def test_a_desktop_requested_over_nats_is_ready_streams_and_completes():
    wanted = "desktop" in os.environ.get("KILN_BUILTIN_TEMPLATES", "")
    rid = uuid.uuid4().hex
    req = {"request_id": rid, "agent_id": "e2e", "duration": 300}
    subject, body = run(ask("e2b.desktop.request.v1", json.dumps(req).encode(),
                            ["e2b.desktop.ready.v1", "e2b.desktop.failed.v1"], 240, rid))
    if subject == "e2b.desktop.failed.v1" and not wanted and "desktop" in body["error"]:
        pytest.skip(f"the server does not serve the desktop template: {body['error']}")
    assert subject == "e2b.desktop.ready.v1", body
    sid = body["sandbox_id"]
    url = body["stream_url"]
    assert f"6080-{sid}." in url and "password=" in url, url
    # The operator's live-view token (run.sh sets E2B_DESKTOP_AUTH_TOKEN) is in the URL.
    view_token = os.environ["E2B_DESKTOP_AUTH_TOKEN"]
    assert url.endswith(f"&kiln_token={view_token}"), url
    try:
        # The stream is up with a VNC password: noVNC's page through Kiln's proxy, and
        # x11vnc offering VNC authentication only.
        host, port = proxy_address()
        vnc_host = f"6080-{sid}.localhost"
        page = httpx.get(f"http://{host}:{port}/vnc.html?kiln_token={view_token}", headers={"Host": vnc_host}, timeout=30)
        assert page.status_code == 200 and "noVNC" in page.text
        _, types = rfb_security_types(vnc_host)
        assert types == [2], types
        sbx = Sandbox.connect(sid)
        assert sbx.commands.run("xdpyinfo -display :0 >/dev/null && echo up").stdout == "up\n"

        async def completed_after_kill():
            nc = await nats.connect(NATS_URL)
            try:
                done: asyncio.Queue = asyncio.Queue()

                async def got(msg):
                    await done.put(json.loads(msg.data))

                await nc.subscribe("e2b.desktop.completed.v1", cb=got)
                await nc.flush()
                await asyncio.to_thread(Sandbox.kill, sid)
                while True:
                    b = await asyncio.wait_for(done.get(), 30)
                    if b.get("request_id") == rid:
                        return b
            finally:
                await nc.drain()

        assert run(completed_after_kill())["sandbox_id"] == sid
    finally:
        Sandbox.kill(sid)
