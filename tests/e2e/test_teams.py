"""Teams: two teams' keys on one server each see, connect to and kill only their own
sandboxes; member keys cannot use the operator's routes.

The teams and their keys are made through the admin routes with the server's own
key (the one `kiln serve` generated, an admin)."""

import os
import uuid

import httpx
import pytest
from e2b import Sandbox, SandboxQuery, Template
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


def test_templates_belong_to_the_team_that_built_them(teams):
    name = f"kiln-e2e-team-{uuid.uuid4().hex[:8]}"
    template = Template().from_template("base").run_cmd("echo team a > /home/user/a.txt")
    Template.build(template, name, api_key=teams["a"])
    try:
        # A starts sandboxes from it; B neither sees, uses, rebuilds nor deletes it.
        sbx = Sandbox.create(name, api_key=teams["a"], timeout=60)
        try:
            assert sbx.commands.run("cat /home/user/a.txt").stdout.strip() == "team a"
        finally:
            sbx.kill()
        listed = admin("GET", "/templates", key=teams["b"]).json()
        assert name not in {t["templateID"] for t in listed}
        r = admin("GET", f"/templates/{name}", key=teams["b"])
        assert r.status_code == 404
        with pytest.raises(SandboxException):
            Sandbox.create(name, api_key=teams["b"], timeout=60)
        assert admin("DELETE", f"/templates/{name}", key=teams["b"]).status_code == 404
        # The name is A's: B cannot build over it.
        r = admin("POST", "/v3/templates", key=teams["b"], json={"name": name})
        assert r.status_code == 409, r.text
        # Built-ins are everyone's to use and only admins' to change.
        assert admin("DELETE", "/templates/base", key=teams["b"]).status_code == 400
        r = admin("POST", "/templates/tags", key=teams["b"],
                  json={"target": "base", "tags": ["mine"]})
        assert r.status_code == 403, r.text
    finally:
        admin("DELETE", f"/templates/{name}", key=teams["a"])
