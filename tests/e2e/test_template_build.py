"""Template builds through the official Template SDK (spec part C): steps, the file
context upload, the layer cache, and failures. Each template is deleted at the end."""

import os
import time
from pathlib import Path

import httpx
import pytest
from e2b import BuildException, Template, wait_for_file

from helpers import probe


def delete_template(name: str) -> None:
    httpx.delete(
        f"{os.environ['E2B_API_URL']}/templates/{name}",
        headers={"X-API-KEY": os.environ["E2B_API_KEY"]},
        timeout=30,
    )


@pytest.fixture
def template_name(uniq):
    name = f"kiln-e2e-{uniq}"
    yield name
    delete_template(name)


def make_context(root: Path) -> Path:
    (root / "app" / "sub").mkdir(parents=True)
    (root / "app" / "hello.txt").write_text("hello from the context\n")
    (root / "app" / "sub" / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    return root


def recipe(ctx: Path):
    return (
        Template(file_context_path=str(ctx))
        .from_debian_image("bookworm")
        .run_cmd("echo built-as-$(whoami) > /opt/built.txt", user="root")
        .copy("app", "/opt/app", mode=0o755)
        .set_envs({"KILN_TPL_VAR": "tpl value"})
        .set_envs({"KILN_TPL_DERIVED": "${KILN_TPL_VAR}!"})
        .set_user("builder")
        .set_workdir("/srv/work")
        .run_cmd("echo $KILN_TPL_VAR > env.txt && whoami > who.txt && pwd > pwd.txt")
        .set_start_cmd(
            "echo started > /tmp/started.txt && sleep infinity",
            wait_for_file("/tmp/started.txt"),
        )
    )


def build(template, name, **kwargs):
    logs = []
    started = time.monotonic()
    info = Template.build(
        template, name, on_build_logs=lambda e: logs.append(e.message), **kwargs
    )
    return info, [str(m) for m in logs], time.monotonic() - started


def test_build_from_steps_then_everything_is_cached(tmp_path, new_sandbox, template_name):
    ctx = make_context(tmp_path)
    info, logs, _ = build(recipe(ctx), template_name)
    assert info.name == template_name
    assert any("[base] FROM bookworm" in m or "FROM debian:bookworm" in m for m in logs), logs
    # The start and ready commands were checked at build time.
    assert any("Template is ready" in m for m in logs), logs

    sbx = new_sandbox(template=template_name)
    # RUN as root, before USER.
    assert probe(sbx, "cat /opt/built.txt") == "built-as-root"
    # COPY of a folder: its contents at dest, with the mode.
    assert probe(sbx, "cat /opt/app/hello.txt") == "hello from the context"
    assert probe(sbx, "/opt/app/sub/tool.sh") == "tool ran"
    assert probe(sbx, "stat -c %a /opt/app/hello.txt") == "755"
    # ENV, USER and WORKDIR at build time ...
    assert probe(sbx, "cat /srv/work/env.txt") == "tpl value"
    assert probe(sbx, "cat /srv/work/who.txt") == "builder"
    assert probe(sbx, "cat /srv/work/pwd.txt") == "/srv/work"
    # ... and as the sandbox's defaults.
    assert probe(sbx, "whoami") == "builder"
    assert probe(sbx, "pwd") == "/srv/work"
    assert probe(sbx, "echo $KILN_TPL_VAR") == "tpl value"
    assert probe(sbx, "echo $KILN_TPL_DERIVED") == "tpl value!"  # expanded at build time
    # The start command ran before the sandbox was handed out.
    assert probe(sbx, "cat /tmp/started.txt") == "started"

    # The same recipe again: every step is a cache hit and the build is quick.
    _, logs2, secs = build(recipe(ctx), template_name)
    steps = [m for m in logs2 if "[builder " in m and "/" in m.split("]")[0]]
    assert steps, logs2
    assert all(m.startswith("CACHED") for m in steps), steps
    assert len(steps) == 7, steps
    assert any("already cached" in m for m in logs2), logs2  # the upload was skipped
    assert secs < 20, secs

    # skip_cache rebuilds.
    _, logs3, _ = build(recipe(ctx), template_name, skip_cache=True)
    rebuilt = [m for m in logs3 if m.startswith("[builder ")]
    assert rebuilt, logs3


def test_failing_run_names_the_step_and_keeps_the_previous_version(new_sandbox, template_name):
    good = Template().from_template("base").run_cmd("echo v1 > /opt/version", user="root")
    build(good, template_name)

    bad = (
        Template()
        .from_template("base")
        .run_cmd("echo v2 > /opt/version", user="root")
        .run_cmd("echo about-to-fail && exit 7")
    )
    with pytest.raises(BuildException) as exc:
        build(bad, template_name)
    message = str(exc.value)
    assert "step 2" in message, message
    assert "failed to run command 'echo about-to-fail && exit 7': exit status 7" in message
    assert "about-to-fail" in message.split("last output:")[-1], message

    # The previous version is still what sandboxes get.
    sbx = new_sandbox(template=template_name)
    assert probe(sbx, "cat /opt/version") == "v1"

    # A new version replaces it at once, warm pool or not.
    newer = Template().from_template("base").run_cmd("echo v3 > /opt/version", user="root")
    build(newer, template_name)
    for _ in range(3):
        sbx = new_sandbox(template=template_name)
        assert probe(sbx, "cat /opt/version") == "v3"


def test_unknown_user_and_unreachable_image(template_name):
    with pytest.raises(BuildException) as exc:
        build(Template().from_template("base").run_cmd("true", user="root123"), template_name)
    assert "step 1" in str(exc.value)
    assert "root123" in str(exc.value)

    with pytest.raises(Exception) as exc:
        build(Template().from_image("python:3.13").run_cmd("true"), template_name)
    assert "python:3.13" in str(exc.value)
    assert "registries" in str(exc.value)
