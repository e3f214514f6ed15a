"""Sandbox hosts over TLS: with `E2B_SANDBOX_URL` unset the SDK reaches a sandbox at
`https://{port}-{id}.{domain}` (envd on 49983, other ports by `get_host`, signed file
URLs). run.sh starts the server with `--sandbox-tls-listen <loopback>:443`; the domain
is `localhost` and the certificate comes from the local CA in `<data-dir>/tls/ca.pem`.

The SDK runs in a child process whose environment is what a user would set
(`E2B_DOMAIN=localhost`, `SSL_CERT_FILE`, no `E2B_SANDBOX_URL`). The SDK's envd client
resolves `*.localhost` to 127.0.0.1 by itself; httpx uses the system resolver, which
here does not (no nss-myhostname), so the child maps `*.localhost` to the listener's
address for it: the one-line DNS setup the docs describe, done in-process.
"""

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, os, socket, sys, time
import httpx

addr = os.environ["KILN_E2E_TLS_ADDR"]
real = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".localhost"):
        host = addr
    return real(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo

from e2b import Sandbox
out = {}
sbx = Sandbox.create(timeout=120)
try:
    out["run"] = sbx.commands.run("echo hi $((6*7))").stdout
    sbx.files.write("/home/user/tls.txt", "over TLS")
    out["read"] = sbx.files.read("/home/user/tls.txt")
    sbx.commands.run(
        "python3 -c \"import http.server as h; h.HTTPServer(('0.0.0.0', 8000), h.SimpleHTTPRequestHandler).serve_forever()\"",
        background=True, cwd="/home/user")
    host = sbx.get_host(8000)
    out["host"] = host
    deadline = time.time() + 30
    while True:
        try:
            r = httpx.get(f"https://{host}/tls.txt", timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SystemExit("port 8000 never answered over TLS")
        time.sleep(0.3)
    out["port"] = r.text
    url = sbx.download_url("/home/user/tls.txt", use_signature_expiration=60)
    out["download_url"] = url
    out["download"] = httpx.get(url, timeout=10).text
    up = sbx.upload_url("/home/user/up.txt", use_signature_expiration=60)
    out["upload_status"] = httpx.post(up, files={"file": ("up.txt", b"uploaded")}, timeout=10).status_code
    out["uploaded"] = sbx.files.read("/home/user/up.txt")
    expired = sbx.download_url("/home/user/tls.txt", use_signature_expiration=1)
    time.sleep(2.5)
    r = httpx.get(expired, timeout=10)
    out["expired"] = [r.status_code, r.text]
    tampered = url.replace("tls.txt", "up.txt")
    out["tampered"] = httpx.get(tampered, timeout=10).status_code
finally:
    sbx.kill()
if "code-interpreter-v1" in os.environ.get("KILN_BUILTIN_TEMPLATES", ""):
    # e2b-code-interpreter always reaches the interpreter at get_host(49999), whatever
    # E2B_SANDBOX_URL says: with sandbox hosts it works as on E2B.
    from e2b_code_interpreter import Sandbox as CodeSandbox
    ci = CodeSandbox.create(timeout=120)
    try:
        out["run_code"] = ci.run_code("x = 6\nx * 7").text
    finally:
        ci.kill()
print(json.dumps(out))
"""


def test_the_sdk_reaches_a_sandbox_by_name_over_tls(tmp_path):
    addr = os.environ.get("KILN_E2E_TLS_ADDR")
    data = os.environ.get("KILN_E2E_DATA_DIR")
    assert addr and data, "run.sh starts the server with --sandbox-tls-listen"
    ca = os.path.join(data, "tls", "ca.pem")
    assert os.path.exists(ca), f"the local CA {ca} was not made"
    env = {k: v for k, v in os.environ.items() if k != "E2B_SANDBOX_URL"}
    env.update(E2B_DOMAIN="localhost", SSL_CERT_FILE=ca)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["run"] == "hi 42\n"
    assert out["read"] == "over TLS"
    assert out["host"].startswith("8000-") and out["host"].endswith(".localhost")
    assert out["port"] == "over TLS"
    assert out["download_url"].startswith("https://49983-"), out["download_url"]
    assert out["download"] == "over TLS"
    assert out["upload_status"] == 200 and out["uploaded"] == "uploaded"
    assert out["expired"][0] == 401 and "expired" in out["expired"][1], out["expired"]
    assert out["tampered"] == 401
    if "code-interpreter-v1" in os.environ.get("KILN_BUILTIN_TEMPLATES", ""):
        assert out["run_code"] == "42"


def test_the_listener_is_trusted_only_through_its_ca_and_only_for_its_names():
    """A client without the local CA fails verification (no silent downgrade); with it,
    a sandbox host verifies; a name outside the domain gets no certificate."""
    import socket
    import ssl

    addr = os.environ["KILN_E2E_TLS_ADDR"]
    ca = os.path.join(os.environ["KILN_E2E_DATA_DIR"], "tls", "ca.pem")

    def handshake(ctx, name):
        with socket.create_connection((addr, 443), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                return tls.version()

    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ssl.create_default_context(), "49983-abc.localhost")
    trusting = ssl.create_default_context(cafile=ca)
    assert handshake(trusting, "49983-abc.localhost") in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLError):
        handshake(trusting, "49983-abc.example.org")
