"""Spells against the running server: Kiln's library, a team's own spells over
`/spells`, the operator's spell files, and `kiln spell` from the shell. Each run is a
fresh sandbox that is gone when the answer arrives."""

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import kiln_bin


def api(method: str, path: str, body=None, timeout: float = 300) -> httpx.Response:
    return httpx.request(
        method,
        os.environ["E2B_API_URL"] + path,
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
        json=body,
        timeout=timeout,
    )


def sandbox_ids() -> set:
    resp = api("GET", "/v2/sandboxes?limit=100")
    assert resp.status_code == 200, resp.text
    return {s["sandboxID"] for s in resp.json()}


def run(name: str, args: dict) -> dict:
    resp = api("POST", f"/spells/{name}/runs", {"args": args})
    assert resp.status_code == 200, resp.text
    return resp.json()


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([kiln_bin(), *args], capture_output=True, text=True, timeout=300)


def test_the_library_is_listed_with_typed_parameters():
    resp = api("GET", "/spells")
    assert resp.status_code == 200, resp.text
    spells = {s["name"]: s for s in resp.json()}
    for name in ["run-python", "describe-csv", "run-repo-tests", "fetch-text"]:
        assert spells[name]["source"] == "builtin"
    params = {p["name"]: p for p in spells["run-python"]["parameters"]}
    assert params["code"]["type"] == "string" and "default" not in params["code"]
    assert params["packages"]["default"] == []


def test_run_python_answers_its_output_and_leaves_no_sandbox():
    before = sandbox_ids()
    result = run("run-python", {"code": "import sys\nprint(6 * 7)\nprint('oops', file=sys.stderr)"})
    assert result["stdout"] == "42\n"
    assert result["stderr"] == "oops\n"
    assert result["exitCode"] == 0 and not result["timedOut"]
    assert result["sandboxID"] not in sandbox_ids() | before


def test_a_teams_spell_gets_typed_arguments_and_returns_files(uniq):
    name = f"square-{uniq}"
    spell = {
        "name": name,
        "description": "Square a number",
        "language": "python",
        "code": (
            "import json, os\n"
            "out = os.environ['KILN_SPELL_OUTPUT']\n"
            "open(os.path.join(out, 'note.txt'), 'w').write(args['label'] * 2)\n"
            "json.dump({'square': args['n'] ** 2}, open(os.path.join(out, 'result.json'), 'w'))\n"
            "print(args['n'])\n"
        ),
        "parameters": [
            {"name": "n", "type": "integer", "description": "the number"},
            {"name": "label", "type": "string", "default": "ab"},
        ],
        "timeoutSecs": 60,
    }
    resp = api("PUT", f"/spells/{name}", spell)
    assert resp.status_code == 200, resp.text
    assert resp.json()["source"] == "team"
    try:
        result = run(name, {"n": 7})
        assert result["stdout"] == "7\n"
        assert result["result"] == {"square": 49}
        files = {f["path"]: f for f in result["files"]}
        assert base64.b64decode(files["note.txt"]["base64"]) == b"abab"
        assert files["note.txt"]["mime"] == "text/plain"

        before = sandbox_ids()
        resp = api("POST", f"/spells/{name}/runs", {"args": {"n": "seven"}})
        assert resp.status_code == 400
        assert "\"n\" must be an integer, got string" in resp.json()["message"]
        resp = api("POST", f"/spells/{name}/runs", {"args": {"n": 1, "m": 2}})
        assert resp.status_code == 400
        assert "unknown argument \"m\"; this spell takes n, label" in resp.json()["message"]
        assert sandbox_ids() == before
    finally:
        assert api("DELETE", f"/spells/{name}").status_code == 204
    assert api("GET", f"/spells/{name}").status_code == 404


def test_a_spell_past_its_timeout_is_stopped(uniq):
    name = f"sleepy-{uniq}"
    spell = {"name": name, "language": "bash", "code": "echo start; sleep 60", "timeoutSecs": 3}
    assert api("PUT", f"/spells/{name}", spell).status_code == 200
    try:
        began = time.monotonic()
        result = run(name, {})
        assert time.monotonic() - began < 45
        assert result["timedOut"] is True
        assert result["exitCode"] is None
        assert result["stdout"] == "start\n"
    finally:
        api("DELETE", f"/spells/{name}")


def test_the_cli_runs_a_spell_with_typed_arguments_and_its_exit_code(uniq, tmp_path):
    name = f"greet-{uniq}"
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n'
        'language = "bash"\n'
        "code = '''\n"
        'echo "hello $ARG_WHO $ARG_TIMES"\n'
        'echo "$ARG_WHO" > "$KILN_SPELL_OUTPUT/who.txt"\n'
        'exit "$ARG_TIMES"\n'
        "'''\n"
        "[[parameters]]\n"
        'name = "who"\n'
        'type = "string"\n'
        "[[parameters]]\n"
        'name = "times"\n'
        'type = "integer"\n'
        "default = 0\n"
    )
    out = kiln("spell", "put", str(path))
    assert out.returncode == 0, out.stderr
    try:
        out = kiln("spell", "run", name, "--arg", "who=world", "--out", str(tmp_path / "out"))
        assert out.returncode == 0, out.stderr
        assert out.stdout == "hello world 0\n"
        assert (tmp_path / "out" / "who.txt").read_text() == "world\n"
        out = kiln("spell", "run", name, "--arg", "who=42", "--arg", "times=3")
        assert out.returncode == 3
        assert out.stdout == "hello 42 3\n"
        out = kiln("spell", "run", name, "--arg", "times=x")
        assert out.returncode != 0 and "not JSON" in out.stderr
        listing = kiln("spell", "list")
        assert name in listing.stdout and "run-python" in listing.stdout
    finally:
        kiln("spell", "delete", name)


def test_operator_spell_files_are_picked_up_and_dropped_as_they_change(uniq):
    spells_dir = Path(os.environ["KILN_E2E_DATA_DIR"]) / "spells"
    spells_dir.mkdir(exist_ok=True)
    name = f"file-{uniq}"
    path = spells_dir / f"{name}.toml"
    path.write_text(f'name = "{name}"\nlanguage = "bash"\ncode = "echo from a file"\n')
    try:
        resp = api("GET", f"/spells/{name}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["source"] == "file"
        assert run(name, {})["stdout"] == "from a file\n"
        # A team cannot delete the operator's spell.
        assert api("DELETE", f"/spells/{name}").status_code == 403
    finally:
        path.unlink()
    assert api("GET", f"/spells/{name}").status_code == 404


def test_describe_csv_returns_statistics_and_a_chart(ci_template):
    csv = "name,score\nann,3\nbob,5\ncid,10\n"
    result = run("describe-csv", {"csv": csv})
    assert result["exitCode"] == 0, result["stderr"]
    assert result["result"]["rows"] == 3
    assert result["result"]["columns"] == ["name", "score"]
    assert result["result"]["describe"]["score"]["max"] == 10
    chart = {f["path"]: f for f in result["files"]}["chart.png"]
    assert chart["mime"] == "image/png"
    assert base64.b64decode(chart["base64"]).startswith(b"\x89PNG")
