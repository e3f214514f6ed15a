"""Surf (`kiln surf`): crawls by a desktop sandbox's Chromium, driven over DevTools
through Kiln's CDP route, on a listener of Surf's own. The test starts `kiln surf`
against the run's server and crawls a small site served inside the sandbox; Surf's
page, opened in headless Chromium, shows the finished crawl.

Needs the `desktop` template (skipped when the server does not serve it, unless
KILN_BUILTIN_TEMPLATES names it, as test_desktop.py does).
"""

import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List

import httpx
import pytest
from e2b import NotFoundException, Sandbox

from conftest import kiln_bin
from helpers import free_port, probe, probe_exit, stop_process, wait_until

pytestmark = pytest.mark.timeout(900)

SITE = {
    "index.html": '<!doctype html><title>Surf home</title><h1>home</h1>'
                  '<a href="a.html">A</a> <a href="/b.html#part">B</a> <a href="b.html">B again</a>'
                  ' <a href="https://example.org/">away</a>',
    "a.html": '<!doctype html><title>Page A</title><p>alpha text</p><a href="c.html">C</a>',
    "b.html": '<!doctype html><title>Page B</title><p>beta</p><a href="index.html">home</a>',
    "c.html": '<!doctype html><title>Page C</title><p>too deep</p>',
}


class FakeModel:
    """A scripted stand-in for an OpenAI-compatible Responses API: answers each
    `POST /responses` with the next scripted output and keeps what it was sent."""

    KEY = "sk-kiln-e2e"

    def __init__(self) -> None:
        self.script: List[List[Dict]] = []
        self.seen: List[Dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                n = len(fake.seen)
                output = fake.script[n - 1] if n <= len(fake.script) else [
                    {"type": "message", "content": [{"type": "output_text", "text": "out of script"}]}]
                answer = json.dumps({"id": f"resp_{n}", "output": output}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def model() -> Iterator[FakeModel]:
    fake = FakeModel()
    yield fake
    fake.server.shutdown()


@pytest.fixture(scope="module")
def surf(model: FakeModel) -> Iterator[str]:
    served = "desktop" in os.environ.get("KILN_BUILTIN_TEMPLATES", "")
    port = free_port()
    env = dict(os.environ)
    env.update(KILN_SURF_LISTEN=f"127.0.0.1:{port}", E2B_SURF_CONCURRENT="1",
               E2B_SURF_TIMEOUT="600", E2B_DOMAIN="localhost", KILN_LOG="info",
               E2B_SURF_MODEL_URL=model.url, E2B_SURF_MODEL_KEY=FakeModel.KEY, E2B_SURF_MODEL="fake-cua")
    proc = subprocess.Popen([kiln_bin(), "surf"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{url}/api/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(up, 30):
            proc.kill()
            pytest.fail("kiln surf did not answer /api/health: " + proc.stderr.read().decode()[-2000:])
        health = httpx.get(f"{url}/api/health", timeout=30).json()
        assert health["status"] == "ok", health
        if not health["desktop_template"]:
            if served:
                pytest.fail(f"KILN_BUILTIN_TEMPLATES names desktop but Surf does not see it: {health}")
            pytest.skip("the server does not serve the desktop template")
        yield url
    finally:
        stop_process(proc, 60)


def finished(surf: str, sid: str, within: float = 600) -> Dict:
    end = time.monotonic() + within
    while time.monotonic() < end:
        s = httpx.get(f"{surf}/api/sessions/{sid}", timeout=30).json()
        if s["status"] in ("completed", "failed"):
            return s
        time.sleep(1)
    pytest.fail(f"session {sid} did not finish within {within} s: {s}")


def test_requests_are_checked(surf):
    for body, status, words in [
        ({"url": "ftp://example.org/"}, 400, "http://"),
        ({"url": "http://a.test/", "depth": 9}, 400, "at most 3"),
        ({"url": "http://a.test/", "colour": "red"}, 400, "colour"),
        ({"url": "http://a.test/", "sandbox_id": "../etc"}, 400, "sandbox_id"),
    ]:
        r = httpx.post(f"{surf}/api/surf", json=body, timeout=30)
        assert r.status_code == status and words in r.text, (body, r.status_code, r.text)
    assert httpx.get(f"{surf}/api/sessions/nosuch", timeout=30).status_code == 404
    assert httpx.delete(f"{surf}/api/sessions/nosuch", timeout=30).status_code == 404


def test_a_crawl_of_a_site_served_in_the_sandbox(surf):
    """Depth 1 from the home page: home, then its same-origin links once each (B's
    fragment dropped), not the external one and not C (depth 2); titles, text and links
    per page, a screenshot per page, the live view's URL; a second session while one
    runs is refused (E2B_SURF_CONCURRENT=1); DELETE ends the session and its sandbox.
    Surf's page shows the finished crawl in headless Chromium."""
    sbx = Sandbox.create("desktop", timeout=900)
    try:
        for name, html in SITE.items():
            sbx.files.write(f"/home/user/site/{name}", html)
        sbx.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 --directory /home/user/site",
                         background=True, timeout=0)
        r = httpx.post(f"{surf}/api/surf", json={"url": "http://127.0.0.1:8000/index.html", "depth": 1,
                                                   "sandbox_id": sbx.sandbox_id}, timeout=30)
        assert r.status_code == 202, r.text
        sid = r.json()["session_id"]
        busy = httpx.post(f"{surf}/api/surf", json={"url": "http://127.0.0.1:8000/"}, timeout=30)
        assert busy.status_code == 429 and "E2B_SURF_CONCURRENT" in busy.text, busy.text

        s = finished(surf, sid)
        assert s["status"] == "completed", s
        assert s["sandbox_id"] == sbx.sandbox_id
        assert s["vnc_url"].startswith(f"https://6080-{sbx.sandbox_id}.localhost/vnc.html?"), s["vnc_url"]
        # The sandbox's ports are public: the view wants the operator's token (run.sh
        # sets E2B_DESKTOP_AUTH_TOKEN for the server, and Surf inherits it).
        assert s["vnc_url"].endswith(f"&kiln_token={os.environ['E2B_DESKTOP_AUTH_TOKEN']}"), s["vnc_url"]
        pages = {p["url"].rsplit("/", 1)[1]: p for p in s["pages"]}
        assert list(pages) == ["index.html", "a.html", "b.html"], [p["url"] for p in s["pages"]]
        home = pages["index.html"]
        assert (home["title"], home["depth"]) == ("Surf home", 0)
        assert home["links"] == ["http://127.0.0.1:8000/a.html", "http://127.0.0.1:8000/b.html"], home["links"]
        assert (pages["a.html"]["title"], pages["a.html"]["depth"]) == ("Page A", 1)
        assert "alpha text" in pages["a.html"]["content"]
        assert pages["b.html"]["title"] == "Page B"
        for p in s["pages"]:
            assert p.get("error") is None, p
            png = httpx.get(f"{surf}{p['screenshot_url']}", timeout=30)
            assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n", p["url"]
        listed = [x for x in httpx.get(f"{surf}/api/sessions", timeout=30).json() if x["session_id"] == sid]
        assert listed and listed[0]["pages_crawled"] == 3

        page_shows_the_crawl(surf, sid)

        assert httpx.delete(f"{surf}/api/sessions/{sid}", timeout=60).status_code == 204
        assert httpx.get(f"{surf}/api/sessions/{sid}", timeout=30).status_code == 404
        assert wait_until(lambda: not sandbox_exists(sbx.sandbox_id), 60), "DELETE did not kill the sandbox"
    finally:
        if sandbox_exists(sbx.sandbox_id):
            sbx.kill()


def sandbox_exists(sid: str) -> bool:
    try:
        Sandbox.get_info(sid)
        return True
    except NotFoundException:
        return False


def page_shows_the_crawl(surf: str, sid: str) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (scripts/install-deps.sh installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.goto(surf, wait_until="load", timeout=60_000)
            box = page.locator(f"#session-{sid}")
            box.locator(".status.completed").wait_for(timeout=30_000)
            titles = box.locator("td.title").all_inner_texts()
            assert titles == ["Surf home", "Page A", "Page B"], titles
            assert box.locator("iframe").get_attribute("src").startswith("https://6080-")
            # The live desktop in its own tab, from the page's link (the frame stays blank
            # in this headless Chromium, which keeps framed pages of other sites from
            # localStorage, where noVNC keeps its settings): the URL's token opens the
            # gate, and noVNC connects.
            with page.context.expect_page() as opened:
                box.locator("a.live").click()
            view = opened.value
            view.wait_for_load_state("load")
            status = lambda: view.evaluate("() => document.getElementById('noVNC_status')?.textContent || ''")
            assert wait_until(lambda: status().startswith("Connected"), 60, interval=0.5), status()
            shot = page.screenshot()
            assert len(shot) > 1000
        finally:
            browser.close()


def test_a_session_makes_its_own_desktop_and_records_a_page_that_fails(surf):
    """Without a sandbox_id Surf makes a desktop sandbox (display, live view and
    Chromium started by itself); a page that does not load is recorded with Chromium's
    reason and the session completes; DELETE kills the sandbox Surf made."""
    r = httpx.post(f"{surf}/api/surf", json={"url": "http://127.0.0.1:9/", "depth": 0}, timeout=30)
    assert r.status_code == 202, r.text
    sid = r.json()["session_id"]
    s = finished(surf, sid)
    assert s["status"] == "completed", s
    assert len(s["pages"]) == 1 and "did not load" in (s["pages"][0].get("error") or ""), s["pages"]
    made = s["sandbox_id"]
    assert made and sandbox_exists(made)
    assert Sandbox.get_info(made).metadata.get("kiln.surf.session") == sid
    assert httpx.delete(f"{surf}/api/sessions/{sid}", timeout=60).status_code == 204
    assert wait_until(lambda: not sandbox_exists(made), 60)


def window_geometry(desk, name: str) -> Dict[str, int]:
    """The largest visible window titled `name`, asked again while windows come and go
    (a Chromium window can vanish between xdotool's search and its next query)."""
    found: List[Dict[str, int]] = []

    def look() -> bool:
        out = probe(desk, f"for w in $(xdotool search --onlyvisible --name '{name}' 2>/dev/null); do "
                          "xdotool getwindowgeometry --shell $w 2>/dev/null; echo; done; true")
        wins = [dict(kv.split("=", 1) for kv in block.split()) for block in out.split("\n\n") if block.strip()]
        wins = [{k: int(v) for k, v in w.items() if k in ("X", "Y", "WIDTH", "HEIGHT")} for w in wins]
        wins = [w for w in wins if len(w) == 4]
        found[:] = sorted(wins, key=lambda w: w["WIDTH"] * w["HEIGHT"])[-1:]
        return bool(found)

    assert wait_until(look, 180, interval=1), f"no visible window named {name!r}"
    return found[0]


AGENT_PAGE = ('<!doctype html><title>agent page</title>'
              '<form onsubmit="document.title = \'submitted: \' + q.value; return false">'
              '<input id="q" autofocus style="position:fixed;inset:0;width:100%;height:100%;font-size:40px">'
              '</form>')


def test_computer_use_mode_acts_on_the_desktop_for_a_scripted_model(surf, model):
    """`task` with a model configured: Surf sends the task and a screenshot to the
    model's Responses API, does each `computer_call`'s action on the desktop (a click,
    then a batch of typing and Enter) and answers with a new screenshot, chained by
    `previous_response_id`, until the model answers in words. The page in the sandbox's
    Chromium was submitted with what the model typed."""
    from e2b_desktop import Sandbox as Desktop

    desk = Desktop.create(timeout=900)
    try:
        desk.files.write("/home/user/site/agent.html", AGENT_PAGE)
        desk.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 --directory /home/user/site",
                          background=True, timeout=0)
        desk.commands.run("chromium --new-window http://127.0.0.1:8000/agent.html", background=True, timeout=0)
        geo = window_geometry(desk, "agent page")
        x = geo["X"] + geo["WIDTH"] // 2
        y = geo["Y"] + geo["HEIGHT"] * 2 // 3  # below the toolbar, in the page
        model.seen.clear()
        model.script[:] = [
            [{"type": "computer_call", "call_id": "call_1",
              "action": {"type": "click", "x": x, "y": y, "button": "left"}}],
            [{"type": "reasoning", "summary": []},
             {"type": "computer_call", "call_id": "call_2", "actions": [
                 {"type": "type", "text": "kiln agent"}, {"type": "keypress", "keys": ["ENTER"]}]}],
            [{"type": "message", "content": [{"type": "output_text", "text": "Submitted."}]}],
        ]
        r = httpx.post(f"{surf}/api/surf", json={"task": "Type 'kiln agent' and submit.",
                                                   "url": "http://127.0.0.1:8000/agent.html",
                                                   "sandbox_id": desk.sandbox_id}, timeout=30)
        assert r.status_code == 202, r.text
        s = finished(surf, r.json()["session_id"])
        assert s["status"] == "completed", s
        assert s["answer"] == "Submitted."
        assert [a["type"] for a in s["steps"]] == ["click", "type", "keypress"], s["steps"]
        names = "for w in $(xdotool search --onlyvisible --class chromium); do xdotool getwindowname $w; done"
        assert wait_until(
            lambda: probe_exit(desk, "xdotool search --onlyvisible --name 'submitted: kiln agent'") == 0, 30
        ), probe(desk, names)

        assert [q["path"] for q in model.seen] == ["/v1/responses"] * 3
        assert all(q["auth"] == f"Bearer {FakeModel.KEY}" for q in model.seen)
        first, second, third = (q["body"] for q in model.seen)
        assert first["model"] == "fake-cua" and first["tools"][0]["type"] == "computer_use_preview"
        content = first["input"][0]["content"]
        assert content[0] == {"type": "input_text", "text": "Type 'kiln agent' and submit."}
        assert content[1]["image_url"].startswith("data:image/png;base64,iVBOR")
        assert second["previous_response_id"] == "resp_1" and third["previous_response_id"] == "resp_2"
        out = second["input"][0]
        assert out["type"] == "computer_call_output" and out["call_id"] == "call_1"
        assert out["output"]["image_url"].startswith("data:image/png;base64,iVBOR")
        assert httpx.delete(f"{surf}/api/sessions/{s['session_id']}", timeout=60).status_code == 204
    finally:
        if sandbox_exists(desk.sandbox_id):
            desk.kill()
