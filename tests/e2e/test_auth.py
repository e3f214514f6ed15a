"""Who may do what: API keys on the control plane, envd access tokens per sandbox.

Uses raw HTTP (httpx, which the SDK depends on) where the SDK would always send the
right credentials."""

import os

import httpx
import pytest
from e2b import AuthenticationException, Sandbox

ENVD_LIST = "/process.Process/List"


def envd_post(path: str, sandbox_id: str, token=None, body: str = "{}") -> httpx.Response:
    headers = {
        "Content-Type": "application/json",
        "Connect-Protocol-Version": "1",
        "E2b-Sandbox-Id": sandbox_id,
        "E2b-Sandbox-Port": "49983",
    }
    if token is not None:
        headers["X-Access-Token"] = token
    url = os.environ["E2B_SANDBOX_URL"].rstrip("/") + path
    return httpx.post(url, headers=headers, content=body, timeout=30)


def test_wrong_api_key_is_rejected():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40, timeout=30)
    r = httpx.get(
        os.environ["E2B_API_URL"].rstrip("/") + "/v2/sandboxes",
        headers={"X-API-KEY": "e2b_" + "1" * 40},
        timeout=30,
    )
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["code"] == 401


def test_envd_needs_the_sandbox_token(new_sandbox):
    a = new_sandbox()
    b = new_sandbox()
    token_a = a._envd_access_token
    assert token_a, "secure sandboxes (the SDK default) must get an envd access token"
    assert token_a != b._envd_access_token

    assert envd_post(ENVD_LIST, a.sandbox_id, token_a).status_code == 200
    assert envd_post(ENVD_LIST, a.sandbox_id).status_code == 401
    assert envd_post(ENVD_LIST, a.sandbox_id, "wrong").status_code == 401
    # One sandbox's token does not open another sandbox.
    assert envd_post(ENVD_LIST, b.sandbox_id, token_a).status_code == 401


def test_unknown_sandbox_answers_502():
    r = envd_post(ENVD_LIST, "doesnotexist0000000", "whatever")
    assert r.status_code == 502
    # /health too: the SDK reads 502 there as "sandbox gone".
    health = httpx.get(
        os.environ["E2B_SANDBOX_URL"].rstrip("/") + "/health",
        headers={"E2b-Sandbox-Id": "doesnotexist0000000", "E2b-Sandbox-Port": "49983"},
        timeout=30,
    )
    assert health.status_code == 502
