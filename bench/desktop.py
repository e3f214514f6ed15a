"""Desktop sandboxes (issue 15's benchmark): `e2b_desktop.Sandbox.create()` until the first
screenshot, a mouse move round trip, a screenshot round trip, each beside its floor measured
in the same run on the host (Xvfb, `xdotool` and `scrot` run directly), and the idle memory
of a desktop sandbox. One run, one server.

Run with the e2e venv's Python (it has `e2b-desktop==2.7.2`) against a running `kiln serve`
that serves the `desktop` template (KILN_BUILTIN_TEMPLATES=code-interpreter-v1,desktop), on
a host with Xvfb, xdotool and scrot (`apt-get install -y xvfb xdotool scrot`):

    E2B_API_URL=... E2B_SANDBOX_URL=... E2B_API_KEY=... \\
      tests/e2e/.venv/bin/python bench/desktop.py [--label 'jail, pool of 2'] \\
      [--creates 20] [--create-interval 3] [--inner-creates 5] [--rounds 50] [--blocks 5] \\
      [--idle 3] [--settle 10]

Whether creates are pooled is the server's choice (`--pool-size`); the script prints how
many of its creates found an idle pooled `desktop` sandbox (`kiln_pool_idle_sandboxes`).

What each figure is:
- *create -> first screenshot*: `Sandbox.create()` (POST /sandboxes, then the SDK starts
  Xvfb and XFCE and polls every 0.5 s until they run) and one `screenshot()`; the
  sandbox is killed after each sample (not timed). Floor: on the host, `Xvfb` with the
  SDK's arguments until it answers a client's connection setup (tried every 5 ms; that
  client stays connected, see `HostX`), then one `scrot`.
- *the start inside*: in `--inner-creates` fresh `desktop` sandboxes (the base SDK's
  create: no Xvfb yet), one Python process starts Xvfb and `startxfce4` as the SDK does
  and polls every 10 ms: where the create's time goes without the SDK's round trips and
  0.5 s polls.
- *round trips*: on one desktop sandbox, `move_mouse(x, y)` (`xdotool mousemove --sync`
  through `commands.run`) and `screenshot()` (`scrot --pointer` through `commands.run`,
  then `files.read` and `files.remove`). Beside them the same command timed in the
  sandbox by the same Python loop that times the host floor (fork+exec of `xdotool`, or
  `scrot` + reading and removing the file, on the host's own Xvfb), and
  `commands.run("true")`, what any SDK call through the proxy and envd costs. They run
  in `--blocks` alternating blocks so that other load on the host falls on all alike.
- *idle memory*: `--idle` desktop sandboxes created together, then `--settle` seconds;
  per sandbox Kiln's `memUsed`/`memCache` (`GET /sandboxes/{id}/metrics`, the SDK's
  `get_metrics()`, the newest sample; the sandbox's memory cgroup), the Prometheus gauge
  `e2b_sandbox_memory_bytes` (read at scrape time), and PSS/RSS summed over the
  sandbox's processes (`/proc/*/smaps_rollup`, read inside as root); and the drop of the
  host's MemAvailable divided by the number of sandboxes. Floor: the PSS of the host's
  Xvfb after the round trips.
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import e2b
from e2b_desktop import Sandbox

TOOLS = {"Xvfb": "xvfb", "xdotool": "xdotool", "scrot": "scrot"}
WIDTH, HEIGHT = 1024, 768

# The same loop times the floor on the host and the command inside the sandbox.
LOOP = r'''
import os, subprocess, sys, time

def pos(i):
    # Never (1, 1), never the same point twice in a row: `mousemove --sync` waits for
    # the pointer to move.
    return 100 + (i * 37) % 800, 100 + (i * 53) % 550

def run(kind, n, shot):
    out = []
    if kind == "move":
        subprocess.run(["xdotool", "mousemove", "1", "1"], check=True)
    for i in range(n + 1):
        t = time.perf_counter()
        if kind == "move":
            x, y = pos(i)
            subprocess.run(["xdotool", "mousemove", "--sync", str(x), str(y)], check=True)
        else:
            subprocess.run(["scrot", "--pointer", shot], check=True)
            with open(shot, "rb") as f:
                size = len(f.read())
            os.unlink(shot)
        if i:  # the first is a warm-up
            out.append(time.perf_counter() - t)
    return out

if __name__ == "__main__":
    kind, n, shot = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(" ".join(f"{x:.6f}" for x in run(kind, n, shot)))
'''

MEMORY = r'''
import os, re
pss = rss = 0
have_pss = False
top = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        name = open(f"/proc/{pid}/comm").read().strip()
        r = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))
    except (OSError, AttributeError):
        continue
    try:
        p = int(re.search(r"Pss:\s+(\d+)", open(f"/proc/{pid}/smaps_rollup").read()).group(1))
        have_pss = True
    except (OSError, AttributeError):
        p = 0
    rss += r
    pss += p
    top.append((r, name))
top.sort(reverse=True)
print(pss if have_pss else "-", rss, ",".join(f"{n}={r // 1024}" for r, n in top[:6]))
'''

# What `Sandbox.create()` starts, timed inside the sandbox (stdout: seconds from Xvfb's
# start until it answers, until XFCE's three processes run, until a screenshot is taken).
START = r'''
import subprocess, time
Q = subprocess.DEVNULL
def ok(cmd):
    return subprocess.run(cmd, shell=True, stdout=Q, stderr=Q).returncode == 0
t = time.perf_counter()
subprocess.Popen("Xvfb :0 -ac -screen 0 1024x768x24 -retro -dpi 96 -nolisten tcp -nolisten unix",
                 shell=True, stdout=Q, stderr=Q, start_new_session=True)
while not ok("xdpyinfo -display :0"):
    time.sleep(0.01)
x = time.perf_counter() - t
subprocess.Popen("startxfce4", shell=True, stdout=Q, stderr=Q, start_new_session=True)
while not ok("pgrep -x xfce4-session && pgrep -x xfwm4 && pgrep -x xfdesktop"):
    time.sleep(0.01)
f = time.perf_counter() - t
subprocess.run(["scrot", "--pointer", "/tmp/kiln-bench-first.png"], check=True)
print(x, f, time.perf_counter() - t)
'''

loop_ns = {}
exec(LOOP, loop_ns)


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def row(name, secs):
    ms = [x * 1000 for x in secs]
    return (f"| {name} | {len(ms)} | {pct(ms, 50):.2f} | {pct(ms, 99):.2f} | "
            f"{statistics.mean(ms):.2f} | {min(ms):.2f} |")


def mib(n):
    return f"{n / (1 << 20):.1f}"


def check_tools():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(sorted({TOOLS[t] for t in missing}))
        sys.exit(f"bench/desktop.py: {', '.join(missing)} not found on the host; the floors "
                 f"run them directly. Install them first: apt-get install -y {pkgs}")


def free_display():
    for d in range(90, 200):
        if not os.path.exists(f"/tmp/.X{d}-lock") and not os.path.exists(f"/tmp/.X11-unix/X{d}"):
            return d
    sys.exit("bench/desktop.py: no free X display between :90 and :199")


class HostX:
    """An Xvfb on the host, started with the arguments the SDK gives the sandbox's, and one
    client connected to it for as long as it runs. In the sandbox XFCE's clients stay
    connected; an Xvfb whose last client leaves resets (it runs xkbcomp again), which
    would cost every short-lived client of the floor tens of ms more than in the sandbox."""

    def __init__(self):
        self.display = f":{free_display()}"
        self.env = dict(os.environ, DISPLAY=self.display)
        self.proc = subprocess.Popen(
            ["Xvfb", self.display, "-ac", "-screen", "0", f"{WIDTH}x{HEIGHT}x24", "-retro",
             "-dpi", "96", "-nolisten", "tcp", "-nolisten", "unix"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Up when it answers a client's connection setup (what xdpyinfo waits for first).
        deadline = time.monotonic() + 30
        self.client = None
        while self.client is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"host Xvfb {self.display} did not start")
            self.client = self._connect()
            if self.client is None:
                time.sleep(0.005)

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(f"\0/tmp/.X11-unix/X{self.display[1:]}")
            # Connection setup: little-endian, protocol 11.0, no authorization.
            s.sendall(b"l\0\x0b\0\0\0\0\0\0\0\0\0")
            if s.recv(8)[:1] == b"\x01":
                return s
        except OSError:
            pass
        s.close()
        return None

    def stop(self):
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def host_first_screenshot(work):
    """Xvfb start until it answers a client, then one scrot read back: the create floor."""
    t = time.perf_counter()
    x = HostX()
    shot = f"{work}/first.png"
    subprocess.run(["scrot", "--pointer", shot], env=x.env, check=True)
    with open(shot, "rb") as f:
        f.read()
    took = time.perf_counter() - t
    os.unlink(shot)
    x.stop()
    return took


def host_loop(x, kind, n, work):
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = x.display
    try:
        return loop_ns["run"](kind, n, f"{work}/shot.png")
    finally:
        if old is None:
            del os.environ["DISPLAY"]
        else:
            os.environ["DISPLAY"] = old


def sandbox_loop(desk, kind, n):
    out = desk.commands.run(f"python3 /tmp/kiln-bench-loop.py {kind} {n} /tmp/kiln-bench-shot.png",
                            timeout=300).stdout
    return [float(v) for v in out.split()]


# POST /sandboxes alone: e2b_desktop's create calls the base SDK's create, then starts
# Xvfb and XFCE with commands.
_api_create = e2b.Sandbox.__dict__["create"].__func__
_last_api = []


def _timed_api_create(cls, *args, **kwargs):
    t = time.perf_counter()
    sbx = _api_create(cls, *args, **kwargs)
    _last_api.append(time.perf_counter() - t)
    return sbx


e2b.Sandbox.create = classmethod(_timed_api_create)


def scrape(url):
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        return r.read().decode()


def idle_pool(url):
    m = re.search(r'kiln_pool_idle_sandboxes\{template="desktop"\} (\d+)', scrape(url))
    return int(m.group(1)) if m else 0


def newest_metric(desk, since):
    """Kiln samples every 5 s: the first sample taken after `since`."""
    deadline = time.monotonic() + 15
    while True:
        m = desk.get_metrics()[-1]
        if m.timestamp.timestamp() >= since or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def mem_available():
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) * 1024


def host_pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return int(re.search(r"Pss:\s+(\d+)", f.read()).group(1)) * 1024
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="", help="runtime and pool, for the row names")
    ap.add_argument("--creates", type=int, default=20)
    ap.add_argument("--create-interval", type=float, default=3.0,
                    help="seconds (untimed) before each create: the previous kill, the pool's refill")
    ap.add_argument("--inner-creates", type=int, default=5,
                    help="sandboxes in which the desktop start is timed from inside")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=5,
                    help="the round trips run in this many alternating blocks")
    ap.add_argument("--idle", type=int, default=3, help="desktop sandboxes for the memory figures")
    ap.add_argument("--settle", type=float, default=10.0)
    a = ap.parse_args()
    check_tools()
    url = os.environ.get("E2B_API_URL", "http://127.0.0.1:3000").rstrip("/")
    label = f", {a.label}" if a.label else ""
    work = tempfile.mkdtemp(prefix="kiln-bench-desktop-")
    pool = idle_pool(url)
    print(f"server {url}: {pool} idle pooled `desktop` sandboxes at the start; load average "
          f"{os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    print()

    sandboxes = []
    hostx = None
    try:
        # --- create -> first screenshot, beside Xvfb + scrot on the host -------------------
        total, api, desktop, first, floor, pooled = [], [], [], [], [], 0
        for _ in range(a.creates):
            floor.append(host_first_screenshot(work))
            time.sleep(a.create_interval)
            if idle_pool(url) > 0:
                pooled += 1
            _last_api.clear()
            t = time.perf_counter()
            desk = Sandbox.create(timeout=900)
            created = time.perf_counter()
            sandboxes.append(desk)
            png = desk.screenshot()
            done = time.perf_counter()
            assert bytes(png[:8]) == b"\x89PNG\r\n\x1a\n"
            total.append(done - t)
            api.append(_last_api[0])
            desktop.append(created - t - _last_api[0])
            first.append(done - created)
            desk.kill()
            sandboxes.remove(desk)
        if a.creates:
            print(f"create -> first screenshot ({pooled} of {a.creates} creates found an idle "
                  f"pooled sandbox; {a.create_interval:g} s untimed before each)")
            print()
            print("| measurement | samples | p50 ms | p99 ms | mean ms | min ms |")
            print("|---|---|---|---|---|---|")
            print(row(f"`Sandbox.create()` + `screenshot()`{label}", total))
            print(row("of which `POST /sandboxes` (the base SDK's create)", api))
            print(row("of which Xvfb + XFCE (the SDK's commands and 0.5 s polls)", desktop))
            print(row("of which the first `screenshot()`", first))
            print(row("floor: host `Xvfb` until it answers a client + one `scrot`", floor))
            print()

        # --- the same start inside a sandbox, without the SDK's 0.5 s polls ----------------
        if a.inner_creates:
            x_up, xfce_up, shot_done = [], [], []
            for _ in range(a.inner_creates):
                time.sleep(a.create_interval)
                sbx = e2b.Sandbox.create(template="desktop", timeout=900, envs={"DISPLAY": ":0"})
                sandboxes.append(sbx)
                sbx.files.write("/tmp/kiln-bench-start.py", START)
                xs, fs, ss = sbx.commands.run("python3 /tmp/kiln-bench-start.py", timeout=300).stdout.split()
                x_up.append(float(xs))
                xfce_up.append(float(fs))
                shot_done.append(float(ss))
                sbx.kill()
                sandboxes.remove(sbx)
            print("the SDK's start done inside a fresh `desktop` sandbox by one Python process, "
                  "polling every 10 ms (no SDK round trips, no 0.5 s polls); from Xvfb's start")
            print()
            print("| measurement | samples | p50 ms | p99 ms | mean ms | min ms |")
            print("|---|---|---|---|---|---|")
            print(row("Xvfb answers `xdpyinfo`", x_up))
            print(row("+ `startxfce4` until xfce4-session, xfwm4 and xfdesktop run", xfce_up))
            print(row("+ one `scrot --pointer`", shot_done))
            print()

        # --- round trips on one sandbox ---------------------------------------------------
        desk = Sandbox.create(timeout=900)
        sandboxes.append(desk)
        desk.files.write("/tmp/kiln-bench-loop.py", LOOP)
        hostx = HostX()

        for _ in range(3):  # warm-up
            desk.commands.run("true")
        desk.screenshot()
        # In blocks, the SDK call, the same command timed in the sandbox and the host floor
        # one after the other, so that other load on the host falls on all three alike.
        true_rt, moves, moves_in, moves_host = [], [], [], []
        shots, sizes, shots_in, shots_host = [], [], [], []
        block = max(1, a.rounds // a.blocks)
        for b in range(0, a.rounds, block):
            n = min(block, a.rounds - b)
            for _ in range(n):
                t = time.perf_counter()
                desk.commands.run("true")
                true_rt.append(time.perf_counter() - t)

            desk.commands.run("xdotool mousemove 1 1")  # `--sync` waits for a move
            for i in range(b, b + n):
                x, y = loop_ns["pos"](i)
                t = time.perf_counter()
                desk.move_mouse(x, y)
                moves.append(time.perf_counter() - t)
            assert desk.get_cursor_position() == loop_ns["pos"](b + n - 1)
            moves_in += sandbox_loop(desk, "move", n)
            moves_host += host_loop(hostx, "move", n, work)

            for _ in range(n):
                t = time.perf_counter()
                png = desk.screenshot()
                shots.append(time.perf_counter() - t)
                sizes.append(len(png))
            shots_in += sandbox_loop(desk, "shot", n)
            shots_host += host_loop(hostx, "shot", n, work)
        subprocess.run(["scrot", "--pointer", f"{work}/size.png"], env=hostx.env, check=True)
        host_size = os.path.getsize(f"{work}/size.png")

        print("round trips on one desktop sandbox (1024x768x24)")
        print()
        print("| measurement | samples | p50 ms | p99 ms | mean ms | min ms |")
        print("|---|---|---|---|---|---|")
        print(row(f"`move_mouse(x, y)`{label}", moves))
        print(row("inside the sandbox: `xdotool mousemove --sync` (fork+exec, timed there)", moves_in))
        print(row("floor: host `xdotool mousemove --sync` on the host's Xvfb", moves_host))
        print(row(f"`screenshot()`{label} (PNG {statistics.median(sizes) / 1024:.0f} KiB)", shots))
        print(row("inside the sandbox: `scrot --pointer` + read + remove (timed there)", shots_in))
        print(row(f"floor: host `scrot --pointer` + read + remove (PNG {host_size / 1024:.0f} KiB, "
                  f"an empty screen)", shots_host))
        print(row("reference: `commands.run(\"true\")`, same sandbox", true_rt))
        print()
        xvfb_pss = host_pss(hostx.proc.pid)
        hostx.stop()
        hostx = None
        desk.kill()
        sandboxes.remove(desk)

        # --- idle memory ------------------------------------------------------------------
        if a.idle:
            time.sleep(3)
            before = mem_available()
            idle = []
            for _ in range(a.idle):
                d = Sandbox.create(timeout=900)
                sandboxes.append(d)
                idle.append(d)
            time.sleep(a.settle)
            settled = time.time()
            after = mem_available()
            text = scrape(url)
            print(f"idle memory: {a.idle} desktop sandboxes (Xvfb + XFCE started by the SDK), "
                  f"{a.settle:g} s after the last create")
            print()
            print("| sandbox | memUsed MiB | memCache MiB | memUsed - memCache MiB | "
                  "`e2b_sandbox_memory_bytes` MiB | PSS sum inside MiB | RSS sum inside MiB | largest RSS (MiB) |")
            print("|---|---|---|---|---|---|---|---|")
            used, nocache = [], []
            for d in idle:
                m = newest_metric(d, settled)
                g = re.search(r'e2b_sandbox_memory_bytes\{[^}]*sandbox_id="%s"[^}]*\} (\S+)'
                              % re.escape(d.sandbox_id), text)
                d.files.write("/tmp/kiln-bench-memory.py", MEMORY)
                pss, rss, top = d.commands.run("python3 /tmp/kiln-bench-memory.py",
                                               user="root").stdout.strip().split(None, 2)
                pss_mib = f"{int(pss) / 1024:.1f}" if pss != "-" else "no smaps_rollup"
                used.append(m.mem_used)
                nocache.append(m.mem_used - m.mem_cache)
                print(f"| {d.sandbox_id} | {mib(m.mem_used)} | {mib(m.mem_cache)} | "
                      f"{mib(m.mem_used - m.mem_cache)} | {mib(float(g.group(1))) if g else '-'} | "
                      f"{pss_mib} | {int(rss) / 1024:.1f} | {top.replace(',', ', ')} |")
            print(f"| mean | {mib(statistics.mean(used))} | | {mib(statistics.mean(nocache))} | | | | |")
            print()
            note = "" if idle_pool(url) == pool == 0 else " (includes the pool's refills)"
            print(f"host MemAvailable drop: {mib(before - after)} MiB for {a.idle}, "
                  f"{mib((before - after) / a.idle)} MiB per sandbox{note}")
            if xvfb_pss is not None:
                print(f"floor: the host's Xvfb after the round trips, PSS {mib(xvfb_pss)} MiB")
    finally:
        if hostx:
            hostx.stop()
        for d in sandboxes:
            try:
                d.kill()
            except Exception:
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
