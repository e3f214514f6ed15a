"""The e2b-desktop SDK (2.7.2, unchanged) against Kiln's `desktop` built-in template.

Privilege tier: a running `kiln serve` that serves the `desktop` template, i.e. started
with KILN_BUILTIN_TEMPLATES=code-interpreter-v1,desktop (run.sh waits for the built-ins).
Without it the module skips, unless KILN_BUILTIN_TEMPLATES names `desktop`, in which case
a missing template fails.

Every SDK call is checked from inside the sandbox: an `xev` window records the pointer
and key events that the SDK's xdotool commands send, `pgrep`/`netstat` see the processes
and ports, and the stream is spoken to as a browser would (HTTP and a WebSocket carrying
RFB) through Kiln's proxy. Timings go to .logs/desktop-timings.jsonl.
"""

import base64
import io
import json
import os
import re
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import httpx
import pytest
from e2b import SandboxException
from e2b_desktop import Sandbox as Desktop
from PIL import Image

from helpers import probe, probe_exit, wait_until

TEMPLATE = "desktop"
TIMINGS = Path(__file__).resolve().parent / ".logs" / "desktop-timings.jsonl"
# Windows of a browser can take long to map on a loaded 2-CPU host under gVisor.
WINDOW_TIMEOUT = 120
STREAM_STOP_TIMEOUT = 60

pytestmark = pytest.mark.timeout(600)


def record(what: str, seconds: float) -> None:
    TIMINGS.parent.mkdir(exist_ok=True)
    with TIMINGS.open("a") as f:
        rec = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runtime": os.environ.get("KILN_E2E_RUNTIME", "default"),
            "what": what,
            "seconds": round(seconds, 3),
        }
        f.write(json.dumps(rec) + "\n")


_create_failed: List[BaseException] = []


@pytest.fixture(scope="module")
def desk() -> Iterator[Desktop]:
    """One desktop sandbox for the module, made by the SDK's own `create` (Xvfb, then
    XFCE, waited for by the SDK). A failed create fails the other tests at once rather
    than being retried (a minute each) for every one of them."""
    if _create_failed:
        pytest.fail(f"Sandbox.create failed for an earlier test: {_create_failed[0]!r}")
    started = time.monotonic()
    try:
        sbx = Desktop.create(timeout=900)
    except SandboxException as e:
        # The SDK raises a plain SandboxException for the 404 of a create.
        if TEMPLATE in os.environ.get("KILN_BUILTIN_TEMPLATES", "") or "404" not in str(e):
            raise
        pytest.skip(f"the server does not serve the {TEMPLATE} template: {e}")
    except BaseException as e:
        _create_failed.append(e)
        raise
    record("Sandbox.create (Xvfb + XFCE ready)", time.monotonic() - started)
    try:
        yield sbx
    finally:
        sbx.kill()


# --- the xev probe -------------------------------------------------------------------

XEV_LOG = "/tmp/kiln-xev.log"


class Xev:
    """An `xev` window in the sandbox and the events it has printed."""

    def __init__(self, sbx: Desktop) -> None:
        self.sbx = sbx
        sbx.commands.run(
            f"stdbuf -oL xev -geometry 400x300+200+150 -event mouse -event keyboard "
            f"> {XEV_LOG} 2>&1",
            background=True,
            timeout=0,
        )
        self.window = probe(sbx, "xdotool search --sync --onlyvisible --name '^Event Tester$'", timeout=60)
        assert re.fullmatch(r"\d+", self.window), self.window
        # xev sets no WM_CLASS; give it one to find it by (get_application_windows).
        sbx.commands.run(f"xdotool set_window --classname kiln-xev --class KilnXev {self.window}")
        geo = dict(
            line.split("=", 1)
            for line in probe(sbx, f"xdotool getwindowgeometry --shell {self.window}").splitlines()
        )
        self.x, self.y = int(geo["X"]), int(geo["Y"])
        self.w, self.h = int(geo["WIDTH"]), int(geo["HEIGHT"])
        # Away from xev's inner 50x50 window at (10, 10).
        self.centre = (self.x + self.w // 2, self.y + self.h // 2)

    def events(self) -> List[Dict[str, str]]:
        text = self.sbx.files.read(XEV_LOG)
        out = []
        for block in text.split("\n\n"):
            m = re.match(r"\s*(\w+) event", block)
            if not m:
                continue
            ev = {"type": m.group(1)}
            for key, pattern in [
                ("button", r"button (\d+)"),
                ("root", r"root:\((-?\d+),(-?\d+)\)"),
                ("keysym", r"\(keysym 0x[0-9a-f]+, ([^)]+)\)"),
                ("state", r"state (0x[0-9a-f]+)"),
                ("string", r'XLookupString gives [1-9]\d* bytes: \([0-9a-f ]+\) "(.*)"'),
            ]:
                found = re.search(pattern, block)
                if found:
                    ev[key] = ",".join(found.groups())
            out.append(ev)
        return out

    def after(self, mark: int, want: int, kinds=("ButtonPress", "ButtonRelease", "KeyPress")) -> List[Dict[str, str]]:
        """The events of `kinds` after the first `mark`, once at least `want` arrived."""
        got: List[Dict[str, str]] = []

        def enough() -> bool:
            nonlocal got
            got = [e for e in self.events()[mark:] if e["type"] in kinds]
            return len(got) >= want

        wait_until(enough, 15)
        return got

    def mark(self) -> int:
        return len(self.events())


@pytest.fixture(scope="module")
def xev(desk: Desktop) -> Xev:
    return Xev(desk)


def presses(events: List[Dict[str, str]]) -> List[Tuple[str, str]]:
    return [(e["button"], e["root"]) for e in events if e["type"] == "ButtonPress"]


# --- create, screen, screenshot --------------------------------------------------------


def test_create_starts_xvfb_and_xfce_and_not_the_stream(desk: Desktop):
    for name in ["Xvfb", "xfce4-session", "xfwm4", "xfdesktop", "xfce4-panel"]:
        assert probe_exit(desk, f"pgrep -x {name}") == 0, f"{name} is not running"
    # The SDK refuses to start a stream if x11vnc runs: the template must not start it.
    assert probe_exit(desk, "pgrep -x x11vnc") == 1
    assert probe(desk, "echo $DISPLAY") == ":0"
    assert "1024x768 pixels" in probe(desk, "xdpyinfo -display :0")
    assert probe(desk, "id -un") == "user"


def test_screen_size_and_screenshot(desk: Desktop):
    assert desk.get_screen_size() == (1024, 768)
    started = time.monotonic()
    png = desk.screenshot()
    record("screenshot (1024x768)", time.monotonic() - started)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    assert img.size == (1024, 768)
    # XFCE has drawn something (a panel and a backdrop), not one flat colour.
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 16
    # The SDK removes its file after reading it.
    assert probe(desk, "ls /tmp | grep -c '^screenshot-' || true") == "0"
    chunks = list(desk.screenshot(format="stream"))
    assert b"".join(chunks)[:8] == b"\x89PNG\r\n\x1a\n"


def test_move_mouse_and_cursor_position(desk: Desktop):
    desk.move_mouse(100, 200)
    assert desk.get_cursor_position() == (100, 200)
    desk.move_mouse(321, 456)
    assert desk.get_cursor_position() == (321, 456)


# --- pointer and keyboard, seen by xev -------------------------------------------------


def test_clicks(desk: Desktop, xev: Xev):
    cx, cy = xev.centre
    at = f"{cx},{cy}"
    m = xev.mark()
    desk.left_click(cx, cy)
    assert presses(xev.after(m, 2)) == [("1", at)]
    assert desk.get_cursor_position() == (cx, cy)

    m = xev.mark()
    desk.right_click(cx + 10, cy + 10)
    assert presses(xev.after(m, 2)) == [("3", f"{cx + 10},{cy + 10}")]

    m = xev.mark()
    desk.middle_click(cx, cy)
    assert presses(xev.after(m, 2)) == [("2", at)]

    m = xev.mark()
    desk.double_click(cx, cy)
    assert presses(xev.after(m, 4)) == [("1", at), ("1", at)]

    # No coordinates: a click where the pointer is.
    m = xev.mark()
    desk.left_click()
    assert presses(xev.after(m, 2)) == [("1", at)]
    with pytest.raises(ValueError):
        desk.right_click(x=cx)


def test_mouse_press_release_and_drag(desk: Desktop, xev: Xev):
    x0, y0 = xev.x + 100, xev.y + 100
    x1, y1 = xev.x + 300, xev.y + 200
    m = xev.mark()
    desk.drag((x0, y0), (x1, y1))
    ev = xev.after(m, 2)
    assert [(e["type"], e["button"], e["root"]) for e in ev] == [
        ("ButtonPress", "1", f"{x0},{y0}"),
        ("ButtonRelease", "1", f"{x1},{y1}"),
    ]
    m = xev.mark()
    desk.mouse_press("right")
    desk.mouse_release("right")
    ev = xev.after(m, 2)
    assert [(e["type"], e["button"]) for e in ev] == [("ButtonPress", "3"), ("ButtonRelease", "3")]


def test_scroll(desk: Desktop, xev: Xev):
    desk.move_mouse(*xev.centre)
    m = xev.mark()
    desk.scroll("up", 3)
    assert [b for b, _ in presses(xev.after(m, 6))] == ["4", "4", "4"]
    m = xev.mark()
    desk.scroll()
    assert [b for b, _ in presses(xev.after(m, 2))] == ["5"]


def test_focus_write_and_press(desk: Desktop, xev: Xev):
    desk.left_click(*xev.centre)  # click to focus (xfwm4)
    assert wait_until(lambda: desk.get_current_window_id() == xev.window, 10), (
        desk.get_current_window_id(),
        xev.window,
    )
    text = "Hi kiln, 42 (ok)!"
    m = xev.mark()
    desk.write(text, chunk_size=6, delay_in_ms=10)
    keys = xev.after(m, len(text), kinds=("KeyPress",))
    assert "".join(e.get("string", "") for e in keys) == text

    m = xev.mark()
    desk.press("enter")
    assert [e["keysym"] for e in xev.after(m, 1, kinds=("KeyPress",))] == ["Return"]

    m = xev.mark()
    desk.press(["ctrl", "a"])
    ev = xev.after(m, 2, kinds=("KeyPress",))
    assert [e["keysym"] for e in ev] == ["Control_L", "a"]
    assert int(ev[1]["state"], 16) & 0x4, ev  # ControlMask held for the `a`


# --- windows, launch, open -------------------------------------------------------------


def test_window_ids_and_titles(desk: Desktop, xev: Xev):
    assert desk.get_window_title(xev.window) == "Event Tester"
    assert desk.get_application_windows("kilnxev") == [xev.window]


def wait_for_window(desk: Desktop, app: str, title: str = "") -> str:
    """A visible window of class `app` whose title contains `title`."""
    found = ""

    def seen() -> bool:
        nonlocal found
        try:
            ids = [w for w in desk.get_application_windows(app) if w]
        except Exception:  # xdotool search exits 1 while there is none
            return False
        for w in ids:
            try:
                if title in desk.get_window_title(w):
                    found = w
                    return True
            except Exception:  # unmapped between the search and the title
                pass
        return False

    assert wait_until(seen, WINDOW_TIMEOUT, 1), (
        f"no {app} window titled *{title}* within {WINDOW_TIMEOUT} s; windows: "
        + probe(desk, "xdotool search --onlyvisible --name . getwindowname %@ 2>&1 || true")
    )
    return found


def test_launch_a_desktop_entry(desk: Desktop):
    desk.launch("xfce4-terminal")
    assert wait_for_window(desk, "xfce4-terminal")


def test_open_a_file(desk: Desktop):
    desk.files.write("/home/user/kiln-open.txt", "opened through xdg-open\n")
    desk.open("/home/user/kiln-open.txt")
    assert wait_for_window(desk, "mousepad", "kiln-open.txt")


@pytest.fixture(scope="module")
def site(desk: Desktop) -> str:
    """A small web site served inside the sandbox (the tests run offline)."""
    for name, title in [("index.html", "Kiln open page"), ("chrome.html", "Kiln chrome page")]:
        desk.files.write(
            f"/home/user/site/{name}",
            f"<!doctype html><title>{title}</title><h1>{title}</h1>",
        )
    desk.commands.run(
        "python3 -m http.server 8765 --bind 127.0.0.1 --directory /home/user/site",
        background=True,
        timeout=0,
    )
    assert wait_until(lambda: probe_exit(desk, "curl -sf -o /dev/null http://127.0.0.1:8765/") == 0, 20)
    return "http://127.0.0.1:8765"


def test_open_a_url_in_the_default_browser(desk: Desktop, site: str):
    started = time.monotonic()
    desk.open(f"{site}/index.html")
    assert wait_for_window(desk, "chromium", "Kiln open page")
    record("open(url) until the Chromium window has the page title", time.monotonic() - started)


def test_launch_google_chrome_runs_chromium(desk: Desktop, site: str):
    started = time.monotonic()
    desk.launch("google-chrome", f"{site}/chrome.html")
    w = wait_for_window(desk, "chromium", "Kiln chrome page")
    record("launch('google-chrome', url) until the Chromium window has the page title", time.monotonic() - started)
    assert w in desk.get_application_windows("chromium")


# Firefox's wasm2c library sandbox sets the GS base (arch_prctl(ARCH_SET_GS), or
# wrgsbase where the kernel allows it) and aborts when it cannot: gVisor answers EINVAL.
GS_BASE_PROBE = (
    "python3 -c 'import ctypes; b = ctypes.c_ulong(); "
    "exit(ctypes.CDLL(None).syscall(158, 0x1004, ctypes.byref(b)) != 0)'"
)


def test_launch_firefox_esr(desk: Desktop, site: str):
    if probe_exit(desk, GS_BASE_PROBE) != 0:
        pytest.skip("this runtime refuses arch_prctl(ARCH_GET_GS) (gVisor), so Firefox aborts at start")
    desk.launch("firefox-esr", f"{site}/index.html")
    assert wait_for_window(desk, "firefox", "Kiln open page")


# --- the stream: x11vnc + noVNC ---------------------------------------------------------


def proxy_address() -> Tuple[str, int]:
    m = re.match(r"https?://([^:/]+):(\d+)", os.environ["E2B_API_URL"])
    assert m, os.environ["E2B_API_URL"]
    return m.group(1), int(m.group(2))


# The operator's token for public desktops' live views (run.sh sets it for the server).
VIEW_TOKEN = os.environ.get("E2B_DESKTOP_AUTH_TOKEN", "")


def websockify_upgrade(host_header: str, extra: str = "") -> socket.socket:
    """A WebSocket upgrade to noVNC's `/websockify` through Kiln's proxy with the Host
    a browser would send (and `extra` header lines); the socket, before the answer."""
    s = socket.create_connection(proxy_address(), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            "GET /websockify HTTP/1.1\r\n"
            f"Host: {host_header}\r\n{extra}"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n"
        ).encode()
    )
    return s


def rfb_security_types(host_header: str, token: str = VIEW_TOKEN) -> Tuple[bytes, List[int]]:
    """Opens noVNC's WebSocket (`/websockify`, subprotocol `binary`) through Kiln's
    proxy with the Host a browser would send and the live view's cookie, and reads
    x11vnc's RFB banner and the security types it offers (1: none, 2: VNC password)."""
    s = websockify_upgrade(host_header, f"Cookie: kiln_view={token}\r\n")
    try:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, f"connection closed during the upgrade: {buf!r}"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"sec-websocket-protocol: binary" in head.lower(), head

        payload = b""

        def read_payload(n: int) -> bytes:
            nonlocal buf, payload
            while len(payload) < n:
                while True:
                    if len(buf) >= 2:
                        ln = buf[1] & 0x7F
                        hdr = 2 + (2 if ln == 126 else 8 if ln == 127 else 0)
                        if len(buf) >= hdr:
                            if ln == 126:
                                ln = struct.unpack(">H", buf[2:4])[0]
                            elif ln == 127:
                                ln = struct.unpack(">Q", buf[2:10])[0]
                            if len(buf) >= hdr + ln:
                                assert buf[0] & 0x0F == 2, f"not a binary frame: {buf[:2]!r}"
                                payload += buf[hdr : hdr + ln]
                                buf = buf[hdr + ln :]
                                break
                    chunk = s.recv(4096)
                    assert chunk, "connection closed during RFB"
                    buf += chunk
            out, payload = payload[:n], payload[n:]
            return out

        banner = read_payload(12)
        # The client's version, in a masked binary frame.
        mask = os.urandom(4)
        msg = b"RFB 003.008\n"
        s.sendall(bytes([0x82, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
        count = read_payload(1)[0]
        types = list(read_payload(count))
        return banner, types
    finally:
        s.close()


def test_stream_without_auth(desk: Desktop):
    started = time.monotonic()
    desk.stream.start()
    record("stream.start() (x11vnc + noVNC listening)", time.monotonic() - started)
    assert probe_exit(desk, "pgrep -x x11vnc") == 0
    assert probe(desk, "netstat -tuln | grep ':6080 ' || true")
    host = desk.get_host(6080)
    assert desk.stream.get_url() == f"https://{host}/vnc.html?autoconnect=true&resize=scale"
    assert desk.stream.get_url(view_only=True, auto_connect=False) == (
        f"https://{host}/vnc.html?view_only=true&resize=scale"
    )
    with pytest.raises(RuntimeError, match="already running"):
        desk.stream.start()

    # What the browser loads, through Kiln's proxy (plain HTTP here; the browser test
    # below goes over TLS). The server has an operator's E2B_DESKTOP_AUTH_TOKEN (run.sh),
    # so the page wants it in its URL, then in the cookie it answers with.
    assert VIEW_TOKEN, "run.sh sets E2B_DESKTOP_AUTH_TOKEN for the server"
    api_host, api_port = proxy_address()
    base = f"http://{api_host}:{api_port}"
    refused = httpx.get(f"{base}/vnc.html", headers={"Host": host}, timeout=30)
    assert refused.status_code == 401 and "kiln_token" in refused.text, refused.text[:300]
    assert httpx.get(f"{base}/vnc.html?kiln_token=not-{VIEW_TOKEN}", headers={"Host": host}, timeout=30).status_code == 401
    page = httpx.get(f"{base}/vnc.html?resize=scale&kiln_token={VIEW_TOKEN}", headers={"Host": host}, timeout=30)
    assert page.status_code == 200, page.text[:300]
    assert "noVNC" in page.text
    cookie = page.headers["set-cookie"]
    assert cookie == f"kiln_view={VIEW_TOKEN}; Path=/; HttpOnly; SameSite=Strict", cookie
    assert httpx.get(f"{base}/app/ui.js", headers={"Host": host}, timeout=30).status_code == 401
    ui = httpx.get(f"{base}/app/ui.js", headers={"Host": host, "Cookie": f"kiln_view={VIEW_TOKEN}"}, timeout=30)
    assert ui.status_code == 200
    # A page of another site (another sandbox under the same domain, say) cannot ride
    # the browser's cookie into the WebSocket.
    s = websockify_upgrade(host, f"Cookie: kiln_view={VIEW_TOKEN}\r\nOrigin: https://3000-other.localhost\r\n")
    try:
        answer = s.recv(4096)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # The token never reaches the sandbox: noVNC's proxy logs each request it serves.
    log = probe(desk, "cat /tmp/novnc.log 2>/dev/null || true")
    assert VIEW_TOKEN not in log, log[-500:]
    banner, types = rfb_security_types(host)
    assert banner.startswith(b"RFB 003.00"), banner
    assert 1 in types and 2 not in types, types

    desk.stream.stop()
    # `stop()` sends SIGTERM (pkill) and does not wait: x11vnc exits within a second or
    # two, but on a loaded host under gVisor it has taken over 10 s, and a `start()`
    # before then raises "Stream is already running".
    assert wait_until(lambda: probe_exit(desk, "pgrep -x x11vnc") == 1, STREAM_STOP_TIMEOUT)
    assert wait_until(lambda: probe(desk, "netstat -tuln | grep ':6080 ' || true") == "", STREAM_STOP_TIMEOUT)


def test_stream_with_auth(desk: Desktop):
    desk.stream.start(require_auth=True)
    try:
        key = desk.stream.get_auth_key()
        assert re.fullmatch(r"[A-Za-z0-9]{16}", key), key
        host = desk.get_host(6080)
        assert desk.stream.get_url(auth_key=key) == (
            f"https://{host}/vnc.html?autoconnect=true&resize=scale&password={key}"
        )
        assert probe_exit(desk, "test -s ~/.vnc/passwd") == 0
        banner, types = rfb_security_types(host)
        assert banner.startswith(b"RFB 003.00"), banner
        assert types == [2], types
    finally:
        desk.stream.stop()
    assert wait_until(lambda: probe_exit(desk, "pgrep -x x11vnc") == 1, STREAM_STOP_TIMEOUT)


# --- the live view in a real browser ---------------------------------------------------


def same_fraction(a: bytes, b: bytes) -> float:
    """The share of pixels two screenshots have (nearly) alike, at `a`'s size."""
    ia = Image.open(io.BytesIO(a)).convert("L")
    ib = Image.open(io.BytesIO(b)).convert("L").resize(ia.size)
    pa, pb = ia.getdata(), ib.getdata()
    return sum(1 for x, y in zip(pa, pb) if abs(x - y) <= 24) / max(1, len(pa))


def named_desktop() -> Desktop:
    """A desktop of its own reached by name (`{port}-{id}.localhost` on run.sh's TLS
    sandbox hosts); skips where the server does not serve the template."""
    try:
        return Desktop.create(timeout=600, domain="localhost")
    except SandboxException as e:
        if TEMPLATE in os.environ.get("KILN_BUILTIN_TEMPLATES", "") or "404" not in str(e):
            raise
        pytest.skip(f"the server does not serve the {TEMPLATE} template: {e}")


def test_the_stream_opens_in_headless_chromium_and_shows_the_desktop():
    """`stream.get_url()` as the SDK builds it (`https://6080-{id}.localhost/vnc.html`,
    domain `localhost`), opened in Debian's Chromium through Kiln's TLS sandbox hosts
    (run.sh: `--sandbox-tls-listen 127.0.0.1:443`) with the VNC password the SDK made:
    noVNC connects, the page shows what the SDK's own screenshot shows, and it follows
    when the SDK opens a window."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (scripts/install-deps.sh installs it)"
    assert os.environ.get("KILN_E2E_TLS_ADDR") == "127.0.0.1", "run.sh serves sandbox hosts on 127.0.0.1:443"
    desk = named_desktop()
    try:
        desk.stream.start(require_auth=True)
        key = desk.stream.get_auth_key()
        url = desk.stream.get_url(auth_key=key)
        assert url.startswith(f"https://6080-{desk.sandbox_id}.localhost/vnc.html?"), url
        # The operator's token for live views (run.sh sets E2B_DESKTOP_AUTH_TOKEN).
        url += f"&kiln_token={VIEW_TOKEN}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                # The page's certificate is the local CA's (test_tls_hosts.py checks that
                # chain); this browser profile does not have that CA.
                ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1024, "height": 768})
                page = ctx.new_page()
                page.goto(url, wait_until="load", timeout=60_000)
                status = lambda: page.evaluate(
                    "() => document.getElementById('noVNC_status')?.textContent || ''"
                )
                assert wait_until(lambda: status().startswith("Connected"), 60, interval=0.5), status()
                shots: List[Tuple[bytes, bytes]] = []

                def shows_the_desktop() -> bool:
                    shots.append((page.screenshot(), desk.screenshot()))
                    return same_fraction(*shots[-1]) > 0.9

                ok = wait_until(shows_the_desktop, 60, interval=1)
                TIMINGS.parent.mkdir(exist_ok=True)
                (TIMINGS.parent / "live-view-before.png").write_bytes(shots[-1][0])
                assert ok, f"the page is not the desktop: {same_fraction(*shots[-1]):.2f} alike"
                screen_before = shots[-1][1]
                # A window the SDK opens shows up in the live view: the screen changed
                # (the SDK's screenshot says so) and the page shows the changed screen.
                desk.launch("xfce4-terminal")

                def follows() -> bool:
                    shots.append((page.screenshot(), desk.screenshot()))
                    page_now, screen_now = shots[-1]
                    return (
                        same_fraction(screen_before, screen_now) < 0.95
                        and same_fraction(page_now, screen_now) > 0.9
                    )

                ok = wait_until(follows, 60, interval=1)
                (TIMINGS.parent / "live-view-after.png").write_bytes(shots[-1][0])
                assert ok, "the live view did not show the new window"
            finally:
                browser.close()
    finally:
        desk.kill()


# --- Chromium over CDP -------------------------------------------------------------------

CDP_PAGE = """<!doctype html><title>Kiln CDP page</title>
<h1 id="greeting">hello over CDP</h1><a href="/next.html">next</a>"""


def test_playwright_drives_the_sandboxes_chromium_over_cdp():
    """Playwright's `connect_over_cdp("https://" + get_host(9222))` (the PyPI client; its
    Node driver speaks to Kiln, no browser download) drives the desktop's own Chromium:
    it opens a page served inside the sandbox, reads its title and text, and takes a
    screenshot, and the page is a window on the desktop the live view shows. Without
    the team's API key (or the traffic token) DevTools answers 401 whatever Host the
    client claims; the browser's URLs come back pointed at Kiln's name, not 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    addr = os.environ.get("KILN_E2E_TLS_ADDR")
    data = os.environ.get("KILN_E2E_DATA_DIR")
    assert addr and data, "run.sh serves sandbox hosts on 127.0.0.1:443"
    ca = os.path.join(data, "tls", "ca.pem")
    api, key = os.environ["E2B_API_URL"], os.environ["E2B_API_KEY"]
    desk = named_desktop()
    host = desk.get_host(9222)
    assert host == f"9222-{desk.sandbox_id}.localhost"
    hosts_before = open("/etc/hosts").read()
    driver_env = {k: os.environ.get(k) for k in ("NODE_EXTRA_CA_CERTS",)}
    try:
        desk.files.write("/home/user/site/index.html", CDP_PAGE)
        desk.commands.run("python3 -m http.server 8123 --bind 127.0.0.1 --directory /home/user/site",
                          background=True, timeout=0)
        # The template's Chromium flags open DevTools on 127.0.0.1:9222.
        desk.commands.run("chromium about:blank", background=True, timeout=0)
        assert wait_until(lambda: probe_exit(desk, "curl -sf -o /dev/null 127.0.0.1:9222/json/version") == 0,
                          WINDOW_TIMEOUT, interval=1), "Chromium's DevTools port did not open"

        # Attacks first: a stranger who knows the id, with and without a forged Host.
        by_id = {"E2b-Sandbox-Id": desk.sandbox_id, "E2b-Sandbox-Port": "9222"}
        for extra in ({}, {"Host": "localhost"}, {"X-API-KEY": "e2b_" + "0" * 40},
                      {"e2b-traffic-access-token": "guess"}):
            r = httpx.get(f"{api}/json/version", headers={**by_id, **extra}, timeout=30)
            assert r.status_code == 401, (extra, r.status_code, r.text)
            assert "Browser" not in r.text
        r = httpx.get(f"{api}/json/version/", headers={**by_id, "X-API-KEY": key}, timeout=30)
        assert r.status_code == 200, r.text
        api_host = api.split("://", 1)[1].rstrip("/")
        assert r.json()["webSocketDebuggerUrl"].startswith(f"ws://{api_host}/devtools/browser/"), r.text

        # By name over TLS, as Playwright will ask: the one-line DNS setup of the docs.
        with open("/etc/hosts", "a") as f:
            f.write(f"{addr} {host} # kiln e2e cdp\n")
        trust = ssl.create_default_context(cafile=ca)
        r = httpx.get(f"https://{host}/json/version/", headers={"X-API-KEY": key}, verify=trust, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["webSocketDebuggerUrl"].startswith(f"wss://{host}/devtools/browser/"), r.text
        assert httpx.get(f"https://{host}/json/list", verify=trust, timeout=30).status_code == 401

        # Playwright's Node driver trusts the local CA like any Node program.
        os.environ["NODE_EXTRA_CA_CERTS"] = ca
        with sync_playwright() as p:
            started = time.monotonic()
            browser = p.chromium.connect_over_cdp(f"https://{host}", headers={"X-API-KEY": key}, timeout=120_000)
            record("connect_over_cdp", time.monotonic() - started)
            try:
                assert browser.version, "no browser version over CDP"
                page = browser.contexts[0].new_page()
                page.goto("http://127.0.0.1:8123/", wait_until="load", timeout=120_000)
                assert page.title() == "Kiln CDP page"
                assert page.inner_text("#greeting") == "hello over CDP"
                png = page.screenshot()
                assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
                shot = Image.open(io.BytesIO(png))
                assert shot.size[0] > 200 and shot.size[1] > 100, shot.size
                # The same page is a window on the sandbox's desktop.
                assert wait_until(
                    lambda: probe_exit(desk, "xdotool search --onlyvisible --name 'Kiln CDP page'") == 0,
                    WINDOW_TIMEOUT, interval=1,
                ), "the page Playwright opened is not a visible window on the desktop"
            finally:
                browser.close()
    finally:
        for k, v in driver_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with open("/etc/hosts", "w") as f:
            f.write(hosts_before)
        desk.kill()


def test_a_private_desktops_live_view_opens_in_a_browser_with_its_token():
    """A desktop whose ports are private (`allow_public_traffic=False`): its live view
    answers 401 to a browser without the token, and opens (noVNC connects) when the
    page's URL carries it as `kiln_token` (then kept in a cookie for the WebSocket)."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (scripts/install-deps.sh installs it)"
    try:
        desk = Desktop.create(timeout=600, domain="localhost", network={"allow_public_traffic": False})
    except SandboxException as e:
        if TEMPLATE in os.environ.get("KILN_BUILTIN_TEMPLATES", "") or "404" not in str(e):
            raise
        pytest.skip(f"the server does not serve the {TEMPLATE} template: {e}")
    try:
        token = desk.traffic_access_token
        assert token
        desk.stream.start()
        url = desk.stream.get_url()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                ctx = browser.new_context(ignore_https_errors=True)
                page = ctx.new_page()
                resp = page.goto(url, wait_until="load", timeout=60_000)
                assert resp.status == 401, resp.status
                # Its ports are private: the operator's token for public views is not its.
                resp = page.goto(f"{url}&kiln_token={VIEW_TOKEN}", wait_until="load", timeout=60_000)
                assert resp.status == 401, resp.status
                resp = page.goto(f"{url}&kiln_token={token}", wait_until="load", timeout=60_000)
                assert resp.status == 200, resp.status
                status = lambda: page.evaluate("() => document.getElementById('noVNC_status')?.textContent || ''")
                assert wait_until(lambda: status().startswith("Connected"), 60, interval=0.5), status()
                cookies = {c["name"]: c for c in ctx.cookies()}
                assert cookies["kiln_view"]["httpOnly"] and cookies["kiln_view"]["secure"]
            finally:
                browser.close()
    finally:
        desk.kill()
