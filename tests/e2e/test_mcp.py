"""`kiln mcp`: Kiln's sandboxes as MCP tools, driven by the official MCP Python client
(`mcp`) over stdio and Streamable HTTP, and the seed's REST bridge on the same listener.

Privilege tier: a running `kiln serve` with code-interpreter-v1 built (run.sh), the kiln
CLI (KILN_BIN) that spawns or serves the MCP server as a client of that API.
"""

import base64
import json
import os
import secrets
import signal
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, List, Optional

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from conftest import kiln_bin
from helpers import free_port, wait_until

API_URL = os.environ.get("E2B_API_URL", "").rstrip("/")
API_KEY = os.environ.get("E2B_API_KEY", "")
CALL_TIMEOUT = 240


# --- helpers -----------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
         timeout: float = CALL_TIMEOUT):
    """(status, parsed JSON or text) of one request; never raises for an HTTP status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def api(method: str, path: str, body: Any = None):
    return http(method, API_URL + path, body, {"X-API-Key": API_KEY})


def running_ids() -> List[str]:
    status, body = api("GET", "/v2/sandboxes?limit=100")
    assert status == 200, body
    return [s["sandboxID"] for s in body]


def gone(ids: List[str], timeout: float = 20) -> bool:
    return wait_until(lambda: not set(ids) & set(running_ids()), timeout)


def mcp_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    env.update({"E2B_API_URL": API_URL, "E2B_API_KEY": API_KEY, "KILN_LOG": "info"})
    env.update(extra)
    return env


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def call(client: Client, tool: str, args: Dict[str, Any]):
    with anyio.fail_after(CALL_TIMEOUT):
        return await client.call_tool(tool, args)


# --- one scenario, run over both transports ----------------------------------------------


async def scenario(client: Client, tag: str) -> List[str]:
    """Lists tools, creates a sandbox, keeps state across run_code calls, writes and reads a
    file, and gets a clear tool error for a bad argument. Returns the ids of the
    sandboxes this session created (all of which the session's end must kill)."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    for name in ["create_sandbox", "list_sandboxes", "kill_sandbox", "run_code", "run_command",
                 "read_file", "write_file", "list_files", "install_package", "get_environment",
                 "list_spells", "run_spell"]:
        assert name in tools, f"{name} missing from tools/list: {sorted(tools)}"
        assert tools[name].description
    assert tools["run_code"].input_schema["type"] == "object"
    assert "code" in tools["run_code"].input_schema["properties"]

    created = await call(client, "create_sandbox", {"template": "base", "metadata": {"mcp-e2e": tag}})
    assert not created.is_error, text_of(created)
    own_id = created.structured_content["sandbox_id"]
    assert own_id in running_ids()

    first = await call(client, "run_code", {"code": "x = 41"})
    assert not first.is_error, text_of(first)
    session_sbx = first.structured_content["sandbox_id"]
    second = await call(client, "run_code", {"code": "x + 1"})
    assert not second.is_error, text_of(second)
    assert second.structured_content["sandbox_id"] == session_sbx
    assert second.structured_content["text"] == "42"
    assert "42" in text_of(second)
    assert second.structured_content["logs"] == {"stdout": [], "stderr": []}
    assert second.structured_content["error"] is None
    assert [r["text"] for r in second.structured_content["results"]] == ["42"]

    printed = await call(client, "run_code", {"code": "print('hello', x)"})
    assert printed.structured_content["logs"]["stdout"] == ["hello 41\n"]
    raised = await call(client, "run_code", {"code": "1/0"})
    assert raised.is_error
    assert raised.structured_content["error"]["name"] == "ZeroDivisionError"
    assert "ZeroDivisionError" in text_of(raised)

    wrote = await call(client, "write_file", {"path": f"/tmp/mcp-{tag}.txt", "content": "from mcp\n"})
    assert not wrote.is_error, text_of(wrote)
    read = await call(client, "read_file", {"path": f"/tmp/mcp-{tag}.txt"})
    assert not read.is_error, text_of(read)
    assert text_of(read) == "from mcp\n"
    # The same file is visible to the interpreter: one sandbox per session.
    seen = await call(client, "run_code", {"code": f"open('/tmp/mcp-{tag}.txt').read()"})
    assert "from mcp" in seen.structured_content["text"]

    listed = await call(client, "list_files", {"path": "/tmp"})
    assert f"/tmp/mcp-{tag}.txt" in [e["path"] for e in listed.structured_content["entries"]]

    cmd = await call(client, "run_command", {"command": "echo $GREETING from $(pwd)", "cwd": "/tmp",
                                             "env": {"GREETING": "hi"}, "sandbox_id": own_id})
    assert not cmd.is_error, text_of(cmd)
    assert cmd.structured_content["stdout"] == "hi from /tmp\n"
    assert cmd.structured_content["exit_code"] == 0
    failed = await call(client, "run_command", {"command": "exit 3", "sandbox_id": own_id})
    assert failed.is_error and failed.structured_content["exit_code"] == 3

    bad = await call(client, "run_code", {"code": "1", "language": "cobol"})
    assert bad.is_error
    message = text_of(bad)
    assert "invalid arguments for run_code" in message and "cobol" in message
    for lang in ["python", "javascript", "typescript", "bash"]:
        assert lang in message, message
    missing = await call(client, "kill_sandbox", {"sandbox_id": "nosuchsandbox"})
    assert missing.is_error and "nosuchsandbox" in text_of(missing)

    js = await call(client, "run_code", {"code": "[1, 2, 3].map(n => n * 2).join(',')",
                                         "language": "javascript"})
    assert not js.is_error, text_of(js)
    assert "2,4,6" in js.structured_content["text"]
    return [own_id, session_sbx]


# --- stdio ---------------------------------------------------------------------------------


def stdio_params(**extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=kiln_bin(), args=["mcp"], env=mcp_env(**extra))


def test_stdio_session_and_its_sandboxes_end_with_it():
    tag = uuid.uuid4().hex[:10]

    async def main():
        async with Client(stdio_params()) as client:
            return await scenario(client, tag)

    ids = anyio.run(main)
    assert gone(ids), f"sandboxes of the stdio session still running: {set(ids) & set(running_ids())}"


def test_stdio_keep_true_outlives_the_session():
    async def main():
        async with Client(stdio_params()) as client:
            kept = await call(client, "create_sandbox", {"template": "base", "keep": True, "timeout": 120})
            dropped = await call(client, "create_sandbox", {"template": "base", "timeout": 120})
            return kept.structured_content["sandbox_id"], dropped.structured_content["sandbox_id"]

    kept, dropped = anyio.run(main)
    try:
        assert gone([dropped])
        assert kept in running_ids()
    finally:
        api("DELETE", f"/sandboxes/{kept}")


def test_stdio_images_environment_background_and_timeouts():
    chart = ("import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
             "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")

    async def main():
        async with Client(stdio_params()) as client:
            plot = await call(client, "run_code", {"code": chart})
            assert not plot.is_error, text_of(plot)
            images = [c for c in plot.content if c.type == "image"]
            assert images and images[0].mime_type == "image/png", plot.content
            assert any("png" in r for r in plot.structured_content["results"])

            env = await call(client, "get_environment", {})
            assert not env.is_error, text_of(env)
            assert env.structured_content["python_version"].startswith("3.")
            assert any(p["name"].lower() == "numpy" for p in env.structured_content["packages"])

            bg = await call(client, "run_command", {"command": "sleep 1; echo done > /tmp/bg-done; sleep 60",
                                                    "background": True})
            assert not bg.is_error and bg.structured_content["pid"] > 0, text_of(bg)
            seen = False
            for _ in range(40):
                check = await call(client, "run_command", {"command": "cat /tmp/bg-done 2>/dev/null || true"})
                if check.structured_content["stdout"] == "done\n":
                    seen = True
                    break
                await anyio.sleep(0.25)
            assert seen, "the background command did not run on"

            slow = await call(client, "run_command", {"command": "echo started; sleep 30", "timeout": 1})
            assert slow.is_error and slow.structured_content.get("timed_out") is True, text_of(slow)
            assert slow.structured_content["stdout"] == "started\n"
            as_root = await call(client, "run_command", {"command": "id -un", "user": "root"})
            assert as_root.structured_content["stdout"] == "root\n"

            missing = await call(client, "read_file", {"path": "/nonexistent/file"})
            assert missing.is_error and "/nonexistent/file" in text_of(missing)
            binary = await call(client, "write_file", {"path": "/tmp/b.bin", "content": "AAEC/w==",
                                                        "encoding": "base64"})
            assert not binary.is_error, text_of(binary)
            back = await call(client, "read_file", {"path": "/tmp/b.bin", "encoding": "base64"})
            assert back.structured_content["content"] == "AAEC/w=="

            refused = await call(client, "install_package", {"packages": ["x; rm -rf /"]})
            assert refused.is_error and "not a package requirement" in text_of(refused)
            none = await call(client, "install_package", {"packages": []})
            assert none.is_error and "at least one package" in text_of(none)

    anyio.run(main)


def test_stdio_without_a_key_says_so():
    env = mcp_env()
    env.pop("E2B_API_KEY")
    out = subprocess.run([kiln_bin(), "mcp"], env=env, capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "needs an API key" in out.stderr


# --- Streamable HTTP and the bridge ------------------------------------------------------


@pytest.fixture(scope="module")
def mcp_http():
    """`kiln mcp --listen 127.0.0.1:<port>` with a server token; stopped with SIGTERM."""
    port = free_port()
    token = secrets.token_hex(16)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [kiln_bin(), "mcp", "--listen", f"127.0.0.1:{port}"],
        env=mcp_env(E2B_MCP_SERVER_TOKEN=token),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return http("GET", base + "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        assert wait_until(up, 30), "kiln mcp --listen did not answer /healthz"
        yield {"base": base, "token": token, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.seek(0)
        print(log.read()[-4000:])
        log.close()


def bearer(token: str) -> Dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def http_client(srv, headers: Dict[str, str]) -> Client:
    return Client(streamable_http_client(
        srv["base"] + "/mcp",
        http_client=httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(CALL_TIMEOUT)),
    ))


def test_http_session_with_the_server_token(mcp_http):
    tag = uuid.uuid4().hex[:10]

    async def main():
        async with http_client(mcp_http, bearer(mcp_http["token"])) as client:
            return await scenario(client, tag)

    ids = anyio.run(main)
    # Closing the client DELETEs the session: its sandboxes go.
    assert gone(ids), f"sandboxes of the HTTP session still running: {set(ids) & set(running_ids())}"


def test_http_session_with_the_callers_api_key(mcp_http):
    for headers in ({"X-API-Key": API_KEY}, bearer(API_KEY)):
        async def main():
            async with http_client(mcp_http, headers) as client:
                out = await call(client, "run_command", {"command": "echo ok"})
                return out

        out = anyio.run(main)
        assert not out.is_error and out.structured_content["stdout"] == "ok\n"


def test_http_refuses_everything_else(mcp_http):
    base = mcp_http["base"]
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    for headers in ({}, bearer("wrong"), {"X-API-Key": "e2b_" + "0" * 40},
                    {"Authorization": "Basic " + mcp_http["token"]}):
        for method, path, body in [("POST", "/mcp", init), ("POST", "/mcp/tools/list", {}),
                                   ("POST", "/mcp/tools/call", {"tool": "list_sandboxes"}),
                                   ("POST", "/sandbox/create", {}), ("DELETE", "/sandbox/x", None)]:
            status, answer = http(method, base + path, body, {**accept, **headers})
            assert status == 401, (headers, path, status, answer)
    # Health answers without credentials and says nothing else.
    assert http("GET", base + "/healthz") == (200, {"status": "ok"})


def sse_or_json(resp: httpx2.Response) -> Dict[str, Any]:
    """The JSON-RPC answer of a Streamable HTTP POST (JSON, or the first SSE data event
    that carries a result or an error)."""
    if resp.headers.get("content-type", "").startswith("application/json"):
        return resp.json()
    for line in resp.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            msg = json.loads(line[5:])
            if "result" in msg or "error" in msg:
                return msg
    raise AssertionError(f"no JSON-RPC answer in {resp.text!r}")


def test_http_shutdown_kills_the_sandboxes_of_open_sessions():
    """Sessions left open (no DELETE; one with its GET stream connected) when the server
    stops: it stops promptly and their sandboxes go too."""
    port = free_port()
    proc = subprocess.Popen([kiln_bin(), "mcp", "--listen", f"127.0.0.1:{port}"], env=mcp_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(base), 30)
        headers = {"X-API-Key": API_KEY, "Accept": "application/json, text/event-stream"}
        with httpx2.Client(base_url=base, headers=headers, timeout=CALL_TIMEOUT) as h:
            init = h.post("/mcp", json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "kiln-e2e", "version": "1"}}})
            assert init.status_code == 200, init.text
            assert sse_or_json(init)["result"]["serverInfo"]["name"] == "kiln"
            sid = init.headers["mcp-session-id"]
            h.headers["mcp-session-id"] = sid
            h.headers["mcp-protocol-version"] = "2025-06-18"
            assert h.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
            resp = h.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                        "params": {"name": "create_sandbox", "arguments": {"template": "base"}}})
            created = sse_or_json(resp)["result"]["structuredContent"]["sandbox_id"]
        assert created in running_ids()

        # A second session through the MCP client, which keeps its GET stream open:
        # the server is stopped while it is connected.
        ids: List[str] = []
        stopped: List[float] = []

        async def connected_then_stopped():
            try:
                async with http_client({"base": base}, {"X-API-Key": API_KEY}) as client:
                    out = await call(client, "create_sandbox", {"template": "base"})
                    ids.append(out.structured_content["sandbox_id"])
                    assert ids[0] in running_ids()
                    started = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    await anyio.to_thread.run_sync(lambda: proc.wait(timeout=40))
                    stopped.append(time.monotonic() - started)
            except Exception:
                # The server went away under the client: expected once it stopped.
                if not stopped:
                    raise

        anyio.run(connected_then_stopped)
        assert proc.wait(timeout=40) == 0
        assert stopped and stopped[0] < 20, f"the server took {stopped} s to stop with a client connected"
        assert ids and not set(ids) & set(running_ids())
        assert created not in running_ids()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def other_team_key() -> str:
    """A member key of a fresh team, made with the server's admin key."""
    name = f"e2e-mcp-{uuid.uuid4().hex[:8]}"
    status, body = api("POST", "/admin/teams", {"name": name})
    assert status == 201, body
    status, body = api("POST", "/admin/keys", {"name": "e2e mcp", "team": name})
    assert status == 201, body
    return body["key"]


def test_http_callers_get_their_keys_rights_and_no_one_elses_session(mcp_http):
    other = other_team_key()
    base = mcp_http["base"]
    accept = {"Accept": "application/json, text/event-stream"}
    status, created = http("POST", base + "/sandbox/create", {"duration": 120}, bearer(mcp_http["token"]))
    assert status == 200, created
    sid = created["sandbox_id"]
    try:
        # Another team's key: the API answers as for a missing sandbox.
        status, out = http("POST", base + "/mcp/tools/call",
                           {"tool": "kill_sandbox", "arguments": {"sandbox_id": sid}}, {"X-API-Key": other})
        assert status == 404, out
        status, out = http("POST", base + "/sandbox/execute",
                           {"sandbox_id": sid, "code": "1"}, {"X-API-Key": other})
        assert status == 404, out
        assert sid in running_ids()

        # A session opened with one key refuses calls made with another.
        with httpx2.Client(base_url=base, timeout=CALL_TIMEOUT) as h:
            init = h.post("/mcp", headers={**accept, "X-API-Key": API_KEY}, json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "kiln-e2e", "version": "1"}}})
            session = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
            h.post("/mcp", headers={**accept, **session, "X-API-Key": API_KEY},
                   json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            own = sse_or_json(h.post("/mcp", headers={**accept, **session, "X-API-Key": API_KEY}, json={
                "jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "run_code", "arguments": {"code": "secret = 7", "sandbox_id": sid}}}))
            assert own["result"].get("isError") is not True, own
            stolen = sse_or_json(h.post("/mcp", headers={**accept, **session, "X-API-Key": other}, json={
                "jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "run_code", "arguments": {"code": "secret", "sandbox_id": sid}}}))
            assert "error" in stolen and "another API key" in stolen["error"]["message"], stolen
            h.delete("/mcp", headers={**session, "X-API-Key": API_KEY})
    finally:
        http("DELETE", f"{base}/sandbox/{sid}", None, bearer(mcp_http["token"]))


def _healthy(base: str) -> bool:
    try:
        return http("GET", base + "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


# The seed's curl examples, against the bridge.


def test_bridge_create_execute_delete(mcp_http):
    base, auth = mcp_http["base"], bearer(mcp_http["token"])
    status, created = http("POST", base + "/sandbox/create",
                           {"duration": 120, "memory_mb": 512, "cpu_limit": 1}, auth)
    assert status == 200, created
    sid = created["sandbox_id"]
    try:
        assert sid in running_ids()
        status, out = http("POST", base + "/sandbox/execute",
                           {"sandbox_id": sid, "language": "python", "code": "y = 6 * 7\nprint(y)"}, auth)
        assert status == 200, out
        assert out["stdout"] == "42\n" and out["stderr"] == "" and out["error"] is None
        # State stays in the sandbox between bridge calls.
        status, out = http("POST", base + "/sandbox/execute",
                           {"sandbox_id": sid, "language": "python", "code": "y + 1"}, auth)
        assert [r["text"] for r in out["results"]] == ["43"]
        status, out = http("POST", base + "/sandbox/execute",
                           {"sandbox_id": sid, "language": "python", "code": "import nope"}, auth)
        assert status == 200 and out["error"]["name"] == "ModuleNotFoundError"
        status, out = http("POST", base + "/sandbox/execute",
                           {"sandbox_id": sid, "language": "cobol", "code": "1"}, auth)
        assert status == 400 and "cobol" in out["error"], out
    finally:
        status, out = http("DELETE", f"{base}/sandbox/{sid}", None, auth)
    assert status == 200 and out["killed"] is True, out
    assert sid not in running_ids()
    status, out = http("DELETE", f"{base}/sandbox/{sid}", None, auth)
    assert status == 404, out


def test_bridge_tools_list_and_call(mcp_http):
    base = mcp_http["base"]
    auth = {"X-API-Key": API_KEY}
    status, listed = http("POST", base + "/mcp/tools/list", {}, auth)
    assert status == 200, listed
    names = [t["name"] for t in listed["tools"]]
    assert "run_code" in names and "run_command" in names
    run_code = next(t for t in listed["tools"] if t["name"] == "run_code")
    assert run_code["inputSchema"]["type"] == "object" and run_code["description"]

    status, result = http("POST", base + "/mcp/tools/call",
                          {"tool": "run_code", "arguments": {"code": "print('from the bridge')"}}, auth)
    assert status == 200, result
    assert result["content"]["stdout"] == "from the bridge\n"
    assert result["is_error"] is False
    # The sandbox made only for that call is gone with it.
    assert result["content"]["sandbox_id"] not in running_ids()

    status, result = http("POST", base + "/mcp/tools/call",
                          {"tool": "run_command", "arguments": {"command": "echo bridged; echo err >&2"}},
                          bearer(mcp_http["token"]))
    assert status == 200, result
    assert result["content"]["stdout"] == "bridged\n" and result["content"]["stderr"] == "err\n"
    assert result["content"]["sandbox_id"] not in running_ids()

    status, result = http("POST", base + "/mcp/tools/call", {"tool": "no_such_tool"}, auth)
    assert status == 404 and "run_code" in result["error"], result
    status, result = http("POST", base + "/mcp/tools/call",
                          {"tool": "run_code", "arguments": {"code": "1", "language": "cobol"}}, auth)
    assert status == 400 and "cobol" in result["error"], result
    status, result = http("POST", base + "/mcp/tools/call", {"tol": "run_code"}, auth)
    assert status == 400, result


# --- spells (needs the server side of /spells) --------------------------------------------


def test_spells_as_tools():
    name = "mcpe2e" + uuid.uuid4().hex[:8]
    spell = {
        "name": name,
        "description": "Greets someone a number of times",
        "language": "python",
        "code": "print(' '.join(['hello ' + args['who']] * args['times']))",
        "parameters": [
            {"name": "who", "type": "string", "description": "whom to greet"},
            {"name": "times", "type": "integer", "default": 2},
        ],
    }
    status, body = api("PUT", f"/spells/{name}", spell)
    assert status in (200, 201), body
    try:
        async def main():
            async with Client(stdio_params()) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}
                tool = tools.get(f"spell_{name}")
                assert tool is not None, sorted(tools)
                assert tool.input_schema["required"] == ["who"]
                assert tool.input_schema["properties"]["times"]["type"] == "integer"
                listed = await call(client, "list_spells", {})
                assert name in [s["name"] for s in listed.structured_content["spells"]]
                by_name = await call(client, "run_spell", {"name": name, "args": {"who": "kiln", "times": 1}})
                by_tool = await call(client, f"spell_{name}", {"who": "mcp"})
                return by_name, by_tool

        by_name, by_tool = anyio.run(main)
        assert not by_name.is_error, text_of(by_name)
        assert by_name.structured_content["stdout"] == "hello kiln\n"
        assert by_tool.structured_content["stdout"] == "hello mcp hello mcp\n"
    finally:
        api("DELETE", f"/spells/{name}")


PAGE_ONE = ("<html><head><title>One</title></head><body style='margin:0'>"
            "<button style='width:100vw;height:100vh;font-size:40px' "
            "onclick=\"document.title='Clicked'\">click me</button></body></html>")
PAGE_TWO = "<html><head><title>Two</title></head><body>two</body></html>"


def test_desktop_tools_drive_a_desktop_sandbox():
    """screenshot, click, type, press and open_url on a `desktop` sandbox (skipped only
    when the server does not serve the template and KILN_BUILTIN_TEMPLATES does not
    name it; CI's does). The MCP server is started with E2B_DESKTOP_RESOLUTION, and the
    screen it starts has that size."""

    async def sh(client, sid, command):
        out = await call(client, "run_command", {"command": command, "sandbox_id": sid,
                                                 "env": {"DISPLAY": ":0"}})
        return out.structured_content["stdout"]

    async def title(client, sid):
        return await sh(client, sid, "for w in $(xdotool search --onlyvisible --class chromium "
                                     "2>/dev/null); do xdotool getwindowname $w; done")

    async def until_title(client, sid, want):
        for _ in range(240):
            if want in await title(client, sid):
                return True
            await anyio.sleep(0.5)
        return False

    async def main():
        async with Client(stdio_params(E2B_DESKTOP_RESOLUTION="1280x800")) as client:
            made = await call(client, "create_sandbox", {"template": "desktop", "timeout": 600})
            if made.is_error:
                message = text_of(made)
                if "desktop" not in os.environ.get("KILN_BUILTIN_TEMPLATES", "") and "404" in message:
                    pytest.skip(f"the server does not serve the desktop template: {message}")
                raise AssertionError(message)
            sid = made.structured_content["sandbox_id"]
            shot = await call(client, "screenshot", {"sandbox_id": sid})
            assert not shot.is_error, text_of(shot)
            images = [c for c in shot.content if c.type == "image"]
            assert images and images[0].mime_type == "image/png"
            first = images[0].data
            png = base64.b64decode(first)
            assert struct.unpack(">II", png[16:24]) == (1280, 800), "the screen is not E2B_DESKTOP_RESOLUTION"

            for name, page in [("one.html", PAGE_ONE), ("two.html", PAGE_TWO)]:
                wrote = await call(client, "write_file", {"sandbox_id": sid, "path": f"/home/user/site/{name}",
                                                          "content": page})
                assert not wrote.is_error, text_of(wrote)
            served = await call(client, "run_command", {
                "command": "cd /home/user/site && python3 -m http.server 8000 --bind 127.0.0.1",
                "sandbox_id": sid, "background": True})
            assert not served.is_error, text_of(served)

            opened = await call(client, "open_url", {"sandbox_id": sid, "url": "http://127.0.0.1:8000/one.html"})
            assert not opened.is_error, text_of(opened)
            assert await until_title(client, sid, "One"), await title(client, sid)
            await anyio.sleep(2)  # the page painted

            # The middle of Chromium's window, below its toolbar: the page's button. The
            # largest visible Chromium window is the browser (its helper windows come and
            # go, and one may vanish between the search and the geometry: ask again).
            g: dict = {}
            for _ in range(40):
                geometry = await sh(client, sid, (
                    "best=; area=0; for w in $(xdotool search --onlyvisible --class chromium 2>/dev/null); do "
                    "eval $(xdotool getwindowgeometry --shell $w 2>/dev/null) || continue; "
                    "a=$((WIDTH*HEIGHT)); if [ $a -gt $area ]; then area=$a; "
                    "best=\"X=$X Y=$Y WIDTH=$WIDTH HEIGHT=$HEIGHT\"; fi; done; echo $best"))
                g = dict(part.split("=", 1) for part in geometry.split() if "=" in part)
                if {"X", "Y", "WIDTH", "HEIGHT"} <= g.keys():
                    break
                await anyio.sleep(0.5)
            assert {"X", "Y", "WIDTH", "HEIGHT"} <= g.keys(), f"no Chromium window geometry: {geometry!r}"
            x = int(g["X"]) + int(g["WIDTH"]) // 2
            y = int(g["Y"]) + int(g["HEIGHT"]) // 2 + 40
            clicked = await call(client, "click", {"sandbox_id": sid, "x": x, "y": y})
            assert not clicked.is_error, text_of(clicked)
            assert await until_title(client, sid, "Clicked"), await title(client, sid)

            for step in [("press", {"keys": "ctrl+l"}),
                         ("type", {"text": "http://127.0.0.1:8000/two.html"}),
                         ("press", {"keys": "Return"})]:
                out = await call(client, step[0], {"sandbox_id": sid, **step[1]})
                assert not out.is_error, text_of(out)
            assert await until_title(client, sid, "Two"), await title(client, sid)

            later = await call(client, "screenshot", {"sandbox_id": sid})
            assert [c for c in later.content if c.type == "image"][0].data != first

            bad = await call(client, "press", {"sandbox_id": sid, "keys": "ctrl+c; rm -rf /"})
            assert bad.is_error and "X key names" in text_of(bad)
            bad = await call(client, "open_url", {"sandbox_id": sid, "url": "file:///etc/passwd"})
            assert bad.is_error and "http://" in text_of(bad)
            return sid

    sid = anyio.run(main)
    assert gone([sid]), "the session's desktop sandbox outlived it"
