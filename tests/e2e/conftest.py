"""Fixtures for the Kiln end-to-end suite.

Privilege tier: a running `kiln serve` (root, the jail runtime) reached through the
environment variables the official E2B SDK reads. `run.sh` starts the server and sets
them; running pytest by hand against a server you started works the same way.
"""

import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest
from e2b import Sandbox

REQUIRED_ENV = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")
SANDBOX_ID_RE = re.compile(r"^[a-z0-9]+$")


def pytest_configure(config):
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        raise pytest.UsageError(
            f"{', '.join(missing)} not set: run tests/e2e/run.sh, or start `kiln serve` "
            "and export the variables its banner prints"
        )


@pytest.fixture(scope="session")
def server_url() -> str:
    return os.environ["E2B_API_URL"].rstrip("/")


@pytest.fixture(scope="session")
def server_port(server_url: str) -> int:
    match = re.search(r":(\d+)$", server_url)
    assert match, f"E2B_API_URL has no port: {server_url}"
    return int(match.group(1))


class SandboxFactory:
    """Creates sandboxes and kills every one of them at teardown."""

    def __init__(self) -> None:
        self.created: List[Sandbox] = []

    def __call__(self, **kwargs) -> Sandbox:
        kwargs.setdefault("timeout", 300)
        sbx = Sandbox.create(**kwargs)
        self.created.append(sbx)
        assert SANDBOX_ID_RE.match(sbx.sandbox_id), sbx.sandbox_id
        return sbx

    def close(self) -> None:
        for sbx in self.created:
            try:
                sbx.kill()
            except Exception:  # already gone, or the server died: reported elsewhere
                pass


@pytest.fixture
def new_sandbox() -> Iterator[SandboxFactory]:
    """A factory for sandboxes owned by one test (killed at its end)."""
    factory = SandboxFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def sbx() -> Iterator[Sandbox]:
    """One sandbox shared by the tests of a module (each works in its own paths)."""
    factory = SandboxFactory()
    yield factory(
        envs={"KILN_E2E_SANDBOX_ENV": "from-create", "KILN_E2E_OVERRIDE": "sandbox"},
        metadata={"suite": "kiln-e2e"},
    )
    factory.close()


@pytest.fixture
def uniq() -> str:
    """A short unique name for paths and metadata values of one test."""
    return uuid.uuid4().hex[:12]


CODE_INTERPRETER_TEMPLATE = "code-interpreter-v1"
CODE_INTERPRETER_DIR = Path(__file__).resolve().parents[2] / "templates" / CODE_INTERPRETER_TEMPLATE
CODE_INTERPRETER_BUILD_TIMEOUT = 1500


def kiln_bin() -> str:
    default = Path(__file__).resolve().parents[2] / "target" / "x86_64-unknown-linux-gnu" / "debug" / "kiln"
    return os.environ.get("KILN_BIN") or str(default)


@pytest.fixture(scope="session")
def ci_template() -> str:
    """The code-interpreter template as the repository has it, built through the kiln
    CLI. The server already built it as a built-in at start (`run.sh` waits for that),
    so unless `templates/code-interpreter-v1` changed since the binary was built, every
    step is a cache hit and this takes seconds."""
    out = subprocess.run(
        [kiln_bin(), "template", "build", str(CODE_INTERPRETER_DIR)],
        capture_output=True,
        text=True,
        timeout=CODE_INTERPRETER_BUILD_TIMEOUT,
        env=dict(os.environ),
    )
    assert out.returncode == 0, (
        f"kiln template build failed ({out.returncode}):\n"
        f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    )
    return CODE_INTERPRETER_TEMPLATE
