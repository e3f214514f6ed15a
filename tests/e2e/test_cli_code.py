"""`kiln run-code`, `kiln install-package` and `kiln env-info` against the running
server: the command-line face of the code interpreter that agent tools reuse."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from e2b_code_interpreter import Sandbox as CodeInterpreter

ROOT = Path(__file__).resolve().parents[2]


def kiln(*args: str, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    binary = os.environ.get("KILN_BIN") or str(
        ROOT / "target" / "x86_64-unknown-linux-gnu" / "debug" / "kiln"
    )
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_run_code_in_a_new_sandbox_prints_output_and_value(ci_template):
    out = kiln("run-code", "--template", ci_template, "print('hello'); 6 * 7")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\n42\n"


def test_run_code_error_exits_1_with_the_traceback(ci_template):
    out = kiln("run-code", "--template", ci_template, "1/0")
    assert out.returncode == 1
    assert "ZeroDivisionError" in out.stderr
    assert "division by zero" in out.stderr


def test_run_code_json_from_stdin(ci_template):
    out = kiln("run-code", "--template", ci_template, "--json", "-", stdin="import sys\nsys.version_info[0]")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == "3"
    assert result["error"] is None


def test_run_code_timeout_is_an_error(ci_template):
    out = kiln("run-code", "--template", ci_template, "--timeout", "2", "import time; time.sleep(30)")
    assert out.returncode != 0
    assert "interrupted" in out.stderr or "longer than" in out.stderr


@pytest.fixture
def ci_sbx(ci_template):
    sbx = CodeInterpreter.create(template=ci_template, timeout=300)
    try:
        yield sbx
    finally:
        sbx.kill()


def test_install_package_is_importable_by_the_next_run(ci_sbx):
    before = ci_sbx.run_code("import cowsay")
    assert before.error is not None and before.error.name == "ModuleNotFoundError"
    out = kiln("install-package", "--sandbox", ci_sbx.sandbox_id, "cowsay==6.1", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Successfully installed cowsay-6.1" in out.stdout
    after = ci_sbx.run_code("import cowsay\ncowsay.__name__")
    assert after.error is None, after.error
    assert after.text == "cowsay"


def test_install_package_refuses_options_and_reports_failures(ci_sbx):
    out = kiln("install-package", "--sandbox", ci_sbx.sandbox_id, "x; rm -rf /")
    assert out.returncode != 0
    assert "not a package requirement" in out.stderr
    out = kiln("install-package", "--sandbox", ci_sbx.sandbox_id, "--", "--index-url=http://evil")
    assert out.returncode != 0
    out = kiln("install-package", "--sandbox", ci_sbx.sandbox_id, "kiln-no-such-package-e2e", timeout=300)
    assert out.returncode != 0
    assert "pip install kiln-no-such-package-e2e failed" in out.stderr


def test_env_info_describes_the_kernel(ci_sbx):
    out = kiln("env-info", "--sandbox", ci_sbx.sandbox_id)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["python_version"].startswith("3.")
    assert info["machine"] == "x86_64"
    names = {p["name"].lower() for p in info["packages"]}
    assert {"numpy", "pandas", "matplotlib", "ipykernel"} <= names
