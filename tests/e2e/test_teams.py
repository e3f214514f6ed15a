"""Teams: two teams' keys on one server each see, connect to and kill only their own
sandboxes; member keys cannot use the operator's routes.

The teams and their keys are made through the admin routes with the server's own
key (the one `kiln serve` generated, an admin)."""

import os
import uuid

import httpx
import pytest
from e2b import Sandbox, SandboxQuery
from e2b.exceptions import SandboxException

API = os.environ["E2B_API_URL"].rstrip("/")


def admin(method: str, path: str, key=None, **kwargs) -> httpx.Response:
    headers = {"X-API-KEY": key or os.environ["E2B_API_KEY"]}
    return httpx.request(method, API + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def teams():
    """Two fresh teams, a member key in each."""
    tag = uuid.uuid4().hex[:8]
    keys = {}
    for team in ("a", "b"):
        name = f"e2e-{team}-{tag}"
        r = admin("POST", "/admin/teams", json={"name": name, "maxSandboxes": 2})
        assert r.status_code == 201, r.text
        r = admin("POST", "/admin/keys", json={"name": f"e2e {team}", "team": name})
        assert r.status_code == 201, r.text
        keys[team] = r.json()["key"]
    return keys


def ids(api_key: str) -> set:
    paginator = Sandbox.list(api_key=api_key, query=SandboxQuery())
    items = list(paginator.next_items())
    while paginator.has_next:
        items.extend(paginator.next_items())
    return {s.sandbox_id for s in items}


def test_two_teams_see_connect_to_and_kill_only_their_own(teams):
    a = Sandbox.create(api_key=teams["a"], timeout=120)
    b = Sandbox.create(api_key=teams["b"], timeout=120)
    try:
        assert ids(teams["a"]) == {a.sandbox_id}
        assert ids(teams["b"]) == {b.sandbox_id}

        # Team B knows A's id: it still cannot see, connect to, run in or kill it.
        with pytest.raises(SandboxException):
            Sandbox.get_info(a.sandbox_id, api_key=teams["b"])
        with pytest.raises(SandboxException):
            Sandbox.connect(a.sandbox_id, api_key=teams["b"])
        assert Sandbox.kill(a.sandbox_id, api_key=teams["b"]) is False
        r = admin("GET", f"/sandboxes/{a.sandbox_id}", key=teams["b"])
        assert r.status_code == 404
        assert r.json()["message"] == f'sandbox "{a.sandbox_id}" not found'

        # A's sandbox is untouched and A still drives it.
        assert a.commands.run("echo still mine").stdout.strip() == "still mine"
        # The operator's key sees both.
        everyone = ids(os.environ["E2B_API_KEY"])
        assert {a.sandbox_id, b.sandbox_id} <= everyone
        assert Sandbox.kill(a.sandbox_id, api_key=teams["a"]) is True
    finally:
        for s in (a, b):
            try:
                s.kill()
            except Exception:
                pass


def test_member_keys_cannot_use_the_operators_routes(teams):
    r = admin("GET", "/admin/keys", key=teams["a"])
    assert r.status_code == 403
    r = admin("POST", "/admin/teams", key=teams["a"], json={"name": "sneaky"})
    assert r.status_code == 403
    r = admin("POST", "/admin/keys", key=teams["b"], json={"name": "x", "admin": True})
    assert r.status_code == 403


def test_a_team_quota_answers_429_naming_it(teams):
    made = []
    try:
        for _ in range(2):
            made.append(Sandbox.create(api_key=teams["b"], timeout=60))
        with pytest.raises(Exception) as err:
            Sandbox.create(api_key=teams["b"], timeout=60)
        assert "maxSandboxes" in str(err.value)
    finally:
        for s in made:
            s.kill()
