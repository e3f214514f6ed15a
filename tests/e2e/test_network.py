"""Network policy per sandbox, E2B's way (`network=` at create, `update_network` later):
egress allow and deny lists of IPs, networks and domains, and private ports.

The destinations are listeners this test serves from a network namespace of its own,
on TEST-NET-2 addresses (198.51.100.0/24, never routed on the Internet): `.1` and `.2`
each answer plain HTTP on 80 and 8080 and HTTPS on 443, echoing the address and Host
they were reached at. Two names are the test's own DNS answer, in the host's
/etc/hosts (what the egress proxy resolves with): `allowed.kiln.test` → .1 and
`other.kiln.test` → .2; the sandbox reaches them with curl's `--resolve`.
"""

import json
import os
import subprocess
import time
import uuid

import httpx
import pytest

from helpers import probe, probe_exit, wait_until

NET = "198.51.100"
A, B = f"{NET}.1", f"{NET}.2"
NAMES = {"allowed.kiln.test": A, "other.kiln.test": B}
HOSTS_MARK = "# kiln e2e test_network"

SERVER = r"""
import http.server, socketserver, ssl, sys, threading

class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization")
        if auth:
            with open(seen, "a") as f:
                f.write("%s %s\n" % (self.headers.get("Host"), auth))
        body = ("served %s:%s host=%s auth=%s\n" % (self.server.server_address[0],
                self.server.server_address[1], self.headers.get("Host"),
                "yes" if auth else "no")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

cert, key, seen = sys.argv[1], sys.argv[2], sys.argv[3]
servers = []
for ip in sys.argv[4:]:
    for port in (80, 8080, 443):
        s = Server((ip, port), Echo)
        if port == 443:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            s.socket = ctx.wrap_socket(s.socket, server_side=True)
        servers.append(s)
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    """The test's own servers on .1 and .2, reachable from the host (and so from
    sandboxes, through the host's NAT) over a veth whose host end has a /32 address
    (the host's networks are off limits to sandboxes; this one is not a network)."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"kiln-nt-{tag}", f"knt{tag}", f"kntp{tag}"
    work = tmp_path_factory.mktemp("network")
    cert, key, csr = work / "cert.pem", work / "key.pem", work / "req.pem"
    # Signed by the run's CA, which the server trusts for upstreams (run.sh): the egress
    # proxy verifies the servers behind `network.rules` like any client.
    ca_key = os.environ.get("KILN_E2E_EGRESS_CA_KEY")
    ca = os.environ.get("KILN_EGRESS_UPSTREAM_CA")
    assert ca_key and ca, "run.sh makes the run's upstream CA (KILN_E2E_EGRESS_CA_KEY)"
    sh("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=allowed.kiln.test",
       "-keyout", str(key), "-out", str(csr))
    (work / "ext.cnf").write_text("subjectAltName=DNS:allowed.kiln.test,DNS:other.kiln.test\n")
    sh("openssl", "x509", "-req", "-in", str(csr), "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
       "-days", "1", "-extfile", str(work / "ext.cnf"), "-out", str(cert))
    seen = work / "seen.log"
    seen.write_text("")
    (work / "server.py").write_text(SERVER)
    sh("ip", "netns", "add", ns)
    server = None
    hosts_before = open("/etc/hosts").read()
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{NET}.254/32", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "route", "add", f"{NET}.0/24", "dev", host_if)
        for ip in (A, B):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns_if)
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"{NET}.254")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", str(work / "server.py"), str(cert), str(key), str(seen), A, B],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        with open("/etc/hosts", "a") as f:
            for name, ip in NAMES.items():
                f.write(f"{ip} {name} {HOSTS_MARK}\n")
        up = lambda: all(
            sh("curl", "-s", "-o", "/dev/null", "-m", "1", f"http://{ip}:8080/", check=False).returncode == 0
            for ip in (A, B)
        )
        if not wait_until(up, 15):
            pytest.fail("the test's own listeners did not come up: "
                        + (server.stderr.read().decode() if server.poll() is not None else "still starting"))
        yield seen
    finally:
        if server:
            server.kill()
            server.wait()
        with open("/etc/hosts", "w") as f:
            f.write(hosts_before)
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


def fetch(sbx, url, *extra, timeout=8, insecure=True):
    """curl in the sandbox: (exit code, body). The names resolve to the test's
    addresses unless `extra` says otherwise; `insecure=False` verifies certificates
    with the sandbox's trust store."""
    resolve = " ".join(
        f"--resolve {name}:{port}:{ip}" for name, ip in NAMES.items() for port in (80, 443)
    )
    args = " ".join(extra)
    k = "-k" if insecure else ""
    cmd = f"curl -s {k} -m {timeout} {args} {resolve} {url}"
    try:
        r = sbx.commands.run(cmd, timeout=timeout + 20)
        return r.exit_code, r.stdout
    except Exception as e:  # CommandExitException: curl failed
        return getattr(e, "exit_code", -1), getattr(e, "stdout", "")


def reaches(sbx, url, *extra) -> bool:
    code, body = fetch(sbx, url, *extra)
    return code == 0 and body.startswith("served ")


def test_without_a_policy_the_test_listeners_are_reachable(new_sandbox, listeners):
    sbx = new_sandbox()
    assert reaches(sbx, f"http://{A}:8080/")
    assert reaches(sbx, "https://other.kiln.test/")


def test_deny_all(new_sandbox, listeners):
    sbx = new_sandbox(network={"deny_out": ["0.0.0.0/0"]})
    for url in (f"http://{A}:8080/", f"http://{B}:80/", "https://allowed.kiln.test/"):
        assert not reaches(sbx, url), url
    # The refusal is immediate (a rejection, not a timeout).
    began = time.monotonic()
    code, _ = fetch(sbx, f"http://{A}:8080/")
    assert code == 7 and time.monotonic() - began < 5, code
    info = sbx.get_info()
    assert info.network and info.network.get("deny_out") == ["0.0.0.0/0"], info.network


def test_allow_one_ip_and_allow_beats_deny(new_sandbox, listeners):
    sbx = new_sandbox(network={"allow_out": [A], "deny_out": ["0.0.0.0/0"]})
    assert reaches(sbx, f"http://{A}:8080/")
    assert not reaches(sbx, f"http://{B}:8080/")
    # A narrower deny inside a wider allow, and an allow inside a wider deny.
    sbx2 = new_sandbox(network={"allow_out": [A], "deny_out": [f"{NET}.0/24"]})
    assert reaches(sbx2, f"http://{A}:8080/")
    assert not reaches(sbx2, f"http://{B}:8080/")


def test_a_domain_allowed_by_sni_and_host_while_another_is_refused(new_sandbox, listeners):
    sbx = new_sandbox(network={"allow_out": ["allowed.kiln.test"], "deny_out": ["0.0.0.0/0"]})
    code, body = fetch(sbx, "https://allowed.kiln.test/")
    assert code == 0 and body.startswith(f"served {A}:443 host=allowed.kiln.test"), (code, body)
    code, body = fetch(sbx, "http://allowed.kiln.test/")
    assert code == 0 and body.startswith(f"served {A}:80 host=allowed.kiln.test"), (code, body)
    assert not reaches(sbx, "https://other.kiln.test/")
    code, body = fetch(sbx, "http://other.kiln.test/")
    assert "denied" in body, (code, body)
    # The allowed name said to an address that is not its own: refused.
    spoof = f"--connect-to allowed.kiln.test:443:{B}:443"
    assert not reaches(sbx, "https://allowed.kiln.test/", spoof)
    code, body = fetch(sbx, f"http://{B}/", "-H 'Host: allowed.kiln.test'")
    assert "disagree" in body, (code, body)
    # Other ports to the allowed name's address stay closed (only the name is allowed).
    assert not reaches(sbx, f"http://{A}:8080/")

    # Counted per sandbox, and in the audit log with the host, never a payload.
    metrics = httpx.get(f"{os.environ['E2B_API_URL']}/metrics", timeout=30).text
    line = next((l for l in metrics.splitlines()
                 if l.startswith("kiln_sandbox_egress_denied") and sbx.sandbox_id in l), None)
    assert line and int(float(line.rsplit(" ", 1)[1])) >= 4, line
    audit = os.path.join(os.environ.get("KILN_E2E_DATA_DIR", "/var/lib/kiln-e2e"), "audit", "audit.log")
    denied = [json.loads(l) for l in open(audit) if '"network.denied"' in l]
    mine = [d for d in denied if d["sandbox_id"] == sbx.sandbox_id]
    assert any("other.kiln.test" in (d.get("subject") or "") for d in mine), mine


def test_update_network_tightens_and_clears_a_live_sandbox(new_sandbox, listeners):
    sbx = new_sandbox()
    assert reaches(sbx, f"http://{A}:8080/")
    sbx.update_network({"allow_out": [A], "deny_out": ["0.0.0.0/0"]})
    assert reaches(sbx, f"http://{A}:8080/")
    assert not reaches(sbx, f"http://{B}:8080/")
    sbx.update_network({"deny_out": ["0.0.0.0/0"]})
    assert not reaches(sbx, f"http://{A}:8080/")
    assert sbx.get_info().network.get("allow_out") in (None, [])
    sbx.update_network({})
    assert reaches(sbx, f"http://{B}:8080/")
    assert not (sbx.get_info().network or {}).get("deny_out")
    # allow_internet_access False is "deny everything".
    sbx.update_network({"allow_internet_access": False})
    assert not reaches(sbx, f"http://{A}:8080/")


def test_bad_policies_are_refused_with_the_reason(new_sandbox):
    from e2b.exceptions import InvalidArgumentException, SandboxException

    with pytest.raises((InvalidArgumentException, SandboxException), match=r"network\.allowOut\[0\]"):
        new_sandbox(network={"allow_out": ["10.0.0.1/8"], "deny_out": ["0.0.0.0/0"]})
    with pytest.raises((InvalidArgumentException, SandboxException), match="network.rules"):
        new_sandbox(network={"allow_out": ["api.example.com"],
                             "rules": {"10.0.0.0/8": [{"transform": {"headers": {"X": "y"}}}]}})
    with pytest.raises((InvalidArgumentException, SandboxException), match="network.egressProxy"):
        new_sandbox(network={"egress_proxy": {"address": "proxy.example.com:1080"}})


def test_private_ports_want_the_traffic_token(new_sandbox):
    sbx = new_sandbox(network={"allow_public_traffic": False, "mask_request_host": "${PORT}-masked.example"})
    token = sbx.traffic_access_token
    assert token, "a private sandbox gets a traffic access token"
    assert sbx.get_info()  # the owner sees its sandbox (and the token came with create)
    sbx.commands.run(
        "python3 -c \"import http.server as h\n"
        "class E(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        b=('host=%s token=%s' % (self.headers.get('Host'), self.headers.get('e2b-traffic-access-token'))).encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers(); self.wfile.write(b)\n"
        "h.HTTPServer(('0.0.0.0', 8000), E).serve_forever()\"",
        background=True,
    )
    url = os.environ["E2B_API_URL"]
    route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}

    def get(headers):
        return httpx.get(url + "/", headers={**route, **headers}, timeout=30)

    assert wait_until(lambda: get({"e2b-traffic-access-token": token}).status_code == 200, 30)
    r = get({})
    assert r.status_code == 403 and "traffic access token" in r.text, r.text
    assert get({"e2b-traffic-access-token": "x" * len(token)}).status_code == 403
    r = get({"e2b-traffic-access-token": token})
    assert r.status_code == 200
    # The sandbox's server sees the masked Host and never the token.
    assert r.text == "host=8000-masked.example token=None", r.text
    # envd keeps its own auth (the SDK does not send the traffic token there).
    assert probe(sbx, "echo ok") == "ok"


# What runs in the sandbox for the secrets test: an HTTPS request through the normal
# trust store (no -k: the sandbox trusts its own egress CA), then a search for anything
# shaped like the secret in its own memory, every process's environment and command
# line, and the files a program would leave it in. Only hashes of what it finds leave.
SEARCH = r"""
import hashlib, json, os, re, urllib.request
pat = re.compile(rb"kiln-secret-[0-9a-f]{32}")
found = set()
def scan(b):
    for m in pat.finditer(b):
        found.add(hashlib.sha256(m.group(0)).hexdigest())
body = urllib.request.urlopen("https://allowed.kiln.test/", timeout=20).read().decode()
body += urllib.request.urlopen("http://allowed.kiln.test/", timeout=20).read().decode()
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
    for line in maps:
        addr, perms = line.split()[:2]
        if not perms.startswith("r") or "[vvar]" in line or "[vsyscall]" in line:
            continue
        lo, hi = (int(x, 16) for x in addr.split("-"))
        try:
            mem.seek(lo)
            scan(mem.read(hi - lo))
        except (OSError, ValueError, OverflowError):
            pass
for pid in os.listdir("/proc"):
    for part in ("environ", "cmdline"):
        try:
            scan(open(f"/proc/{pid}/{part}", "rb").read())
        except OSError:
            pass
for top in ("/etc", "/home", "/root", "/tmp", "/var/tmp", "/opt", "/usr/local"):
    for d, _, files in os.walk(top):
        for f in files:
            try:
                p = os.path.join(d, f)
                if os.path.isfile(p) and os.path.getsize(p) < 4 << 20:
                    scan(open(p, "rb").read())
            except OSError:
                pass
print(json.dumps({"body": body, "found": sorted(found)}))
"""


def test_a_header_rule_adds_a_secret_the_sandbox_never_holds(new_sandbox, listeners):
    import hashlib
    from e2b import Secret

    seen = listeners
    value = "kiln-secret-" + uuid.uuid4().hex
    name = "e2e-" + uuid.uuid4().hex[:8]
    info = Secret.create(name, value, metadata={"purpose": "e2e"})
    assert info.name == name and info.version == 1
    try:
        rule = {"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}}
        sbx = new_sandbox(network={
            "allow_out": ["allowed.kiln.test"],
            "deny_out": ["0.0.0.0/0"],
            "rules": {"allowed.kiln.test": [rule]},
        })
        # Names the sandbox resolves itself (urllib has no --resolve).
        sbx.commands.run(f"echo '{A} allowed.kiln.test' >> /etc/hosts", user="root")
        # curl verifies with the system trust store, which now has the sandbox's CA.
        code, body = fetch(sbx, "https://allowed.kiln.test/", insecure=False)
        assert code == 0 and "auth=yes" in body, (code, body)
        sbx.files.write("/tmp/search.py", SEARCH)
        # A decoy of the same shape the sandbox does hold: the search must find it.
        decoy = "kiln-secret-" + uuid.uuid4().hex
        out = json.loads(probe(sbx, "python3 /tmp/search.py", envs={"DECOY": decoy}, timeout=120))
        assert hashlib.sha256(decoy.encode()).hexdigest() in out["found"], "the search finds nothing"
        assert out["body"].count("auth=yes") == 2, out["body"]
        # The real server got the value, on HTTPS and HTTP.
        lines = [l for l in seen.read_text().splitlines() if l.startswith("allowed.kiln.test")]
        assert len(lines) >= 3 and all(l.endswith(f"Bearer {value}") for l in lines), lines
        # The sandbox never held it.
        assert hashlib.sha256(value.encode()).hexdigest() not in out["found"]
        assert value not in json.dumps(sbx.get_info().network or {})
        assert Secret.fill(name) in json.dumps(sbx.get_info().network or {})
        # Another host than the rule's gets no header (and stays denied here).
        assert not reaches(sbx, "https://other.kiln.test/")
        # A new value is used from the next request on.
        value2 = "kiln-secret-" + uuid.uuid4().hex
        assert Secret.update(name, value2).version == 2
        code, body = fetch(sbx, "https://allowed.kiln.test/")
        assert code == 0 and seen.read_text().rstrip().endswith(f"Bearer {value2}")
    finally:
        Secret.destroy(name)
    # A rule naming a secret that is gone: the request fails, saying which.
    code, body = fetch(sbx, "http://allowed.kiln.test/")
    assert name in body and "auth=" not in body, (code, body)
