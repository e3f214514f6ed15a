"""The egress proxy's cost (issue 13's benchmark): the same HTTP requests from a sandbox
with no policy (the floor: the kernel's forwarding and NAT) and from sandboxes whose
policy sends them through the egress proxy (a domain rule: spliced; a header rule:
TLS terminated and re-encrypted), plus create p50 with and without a policy. One run,
one server.

Run as root with the e2e venv's Python against a running `kiln serve`:

    E2B_API_URL=... E2B_SANDBOX_URL=... E2B_API_KEY=... \\
      tests/e2e/.venv/bin/python bench/egress-proxy.py [--rounds 50] [--creates 10] \\
      [--upstream-ca-key KEY --upstream-ca CA]

The destination is a server this script runs in a network namespace of its own on
198.51.100.1 (TEST-NET-2), named `bench.kiln.test` in the host's /etc/hosts for the
run. The HTTPS rows need the server started with `KILN_EGRESS_UPSTREAM_CA=CA` and this
script given the CA's key, so the proxy can verify the server it re-encrypts to.
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import uuid

from e2b import Sandbox

IP = "198.51.100.1"
NAME = "bench.kiln.test"
MARK = "# kiln bench egress-proxy"

SERVER = r"""
import http.server, socketserver, ssl, sys, threading
BIG = b"x" * (64 << 20)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = BIG if self.path == "/big" else b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
ip, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
plain = S((ip, 80), H)
threading.Thread(target=plain.serve_forever, daemon=True).start()
if cert != "-":
    tls = S((ip, 443), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=tls.serve_forever, daemon=True).start()
threading.Event().wait()
"""


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def row(name, ms):
    return f"| {name} | {pct(ms, 50):.2f} ms | {pct(ms, 99):.2f} ms | {statistics.mean(ms):.2f} ms |"


def latencies(sbx, url, rounds, insecure):
    """`rounds` requests, one curl each, timed by curl (connect + TLS + answer)."""
    k = "-k" if insecure else ""
    cmd = (f"for i in $(seq {rounds}); do curl -s {k} -o /dev/null -w '%{{time_total}}\\n' "
           f"--resolve {NAME}:80:{IP} --resolve {NAME}:443:{IP} {url}; done")
    out = sbx.commands.run(cmd, timeout=300).stdout.split()
    return [float(x) * 1000 for x in out]


def throughput(sbx, url, insecure, runs=5):
    """The median of `runs` downloads, in MiB/s."""
    k = "-k" if insecure else ""
    out = sbx.commands.run(
        f"for i in $(seq {runs}); do curl -s {k} -o /dev/null -w '%{{speed_download}}\\n' "
        f"--resolve {NAME}:80:{IP} --resolve {NAME}:443:{IP} {url}; done", timeout=300).stdout
    return statistics.median(float(x) for x in out.split()) / (1 << 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--creates", type=int, default=10)
    ap.add_argument("--upstream-ca")
    ap.add_argument("--upstream-ca-key")
    a = ap.parse_args()

    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"kiln-bench-{tag}", f"kb{tag}", f"kbp{tag}"
    work = tempfile.mkdtemp()
    cert = key = "-"
    if a.upstream_ca and a.upstream_ca_key:
        cert, key, csr = f"{work}/cert.pem", f"{work}/key.pem", f"{work}/req.pem"
        sh("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={NAME}",
           "-keyout", key, "-out", csr)
        open(f"{work}/ext.cnf", "w").write(f"subjectAltName=DNS:{NAME}\n")
        sh("openssl", "x509", "-req", "-in", csr, "-CA", a.upstream_ca, "-CAkey", a.upstream_ca_key,
           "-CAcreateserial", "-days", "1", "-extfile", f"{work}/ext.cnf", "-out", cert)
    open(f"{work}/server.py", "w").write(SERVER)
    hosts_before = open("/etc/hosts").read()
    sh("ip", "netns", "add", ns)
    server = None
    sandboxes = []
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        sh("ip", "addr", "add", "198.51.100.254/32", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "route", "add", f"{IP}/32", "dev", host_if)
        sh("ip", "-n", ns, "addr", "add", f"{IP}/24", "dev", ns_if)
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "198.51.100.254")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "python3", f"{work}/server.py", IP, cert, key])
        with open("/etc/hosts", "a") as f:
            f.write(f"{IP} {NAME} {MARK}\n")
        time.sleep(1)

        policies = {
            "no policy (floor)": None,
            "domain rule (spliced by the proxy)": {"allow_out": [NAME], "deny_out": ["0.0.0.0/0"]},
            "header rule (TLS terminated, re-encrypted)": {
                "allow_out": [NAME], "deny_out": ["0.0.0.0/0"],
                "rules": {NAME: [{"transform": {"headers": {"X-Bench": "1"}}}]},
            },
        }
        print("| request | p50 | p99 | mean |")
        print("|---|---|---|---|")
        speeds = []
        for label, net in policies.items():
            if net and "rules" in net and cert == "-":
                continue
            sbx = Sandbox.create(timeout=900, **({"network": net} if net else {}))
            sandboxes.append(sbx)
            plain = latencies(sbx, f"http://{NAME}/", a.rounds, True)
            print(row(f"HTTP GET, {label}", plain))
            speeds.append((f"HTTP 64 MiB, {label}", throughput(sbx, f"http://{NAME}/big", True)))
            if cert != "-":
                insecure = not (net and "rules" in net)
                tls = latencies(sbx, f"https://{NAME}/", a.rounds, insecure)
                print(row(f"HTTPS GET, {label}", tls))
                speeds.append((f"HTTPS 64 MiB, {label}",
                               throughput(sbx, f"https://{NAME}/big", insecure)))
        print()
        print("| download (median of 5) | MiB/s |")
        print("|---|---|")
        for label, mib in speeds:
            print(f"| {label} | {mib:.0f} |")

        print()
        print("| create | p50 | p99 | mean |")
        print("|---|---|---|---|")
        for label, net in [("no policy", None),
                           ("IP policy", {"allow_out": [IP], "deny_out": ["0.0.0.0/0"]}),
                           ("domain policy", {"allow_out": [NAME], "deny_out": ["0.0.0.0/0"]})]:
            times = []
            for _ in range(a.creates):
                t = time.perf_counter()
                sbx = Sandbox.create(timeout=120, **({"network": net} if net else {}))
                times.append((time.perf_counter() - t) * 1000)
                sbx.kill()
            print(row(label, times))
    finally:
        for sbx in sandboxes:
            try:
                sbx.kill()
            except Exception:
                pass
        if server:
            server.kill()
            server.wait()
        with open("/etc/hosts", "w") as f:
            f.write(hosts_before)
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


if __name__ == "__main__":
    main()
