"""Template builds through the official Template SDK (spec part C): steps, the file
context upload, the layer cache, base images pulled from a registry, and failures.
Each template is deleted at the end."""

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from e2b import BuildException, Template, wait_for_file

from helpers import free_port, probe, stop_process


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


def sandbox_runtime(sandbox_id: str) -> str:
    """Kiln's `runtime` extension of `GET /sandboxes/{id}`."""
    r = httpx.get(
        f"{os.environ['E2B_API_URL']}/sandboxes/{sandbox_id}",
        headers={"X-API-KEY": os.environ["E2B_API_KEY"]},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["runtime"]


def kiln_template_build(project: Path, timeout: float) -> subprocess.CompletedProcess:
    from conftest import kiln_bin

    return subprocess.run(
        [kiln_bin(), "template", "build", str(project)],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )


def test_kiln_toml_pins_the_templates_runtime(tmp_path, new_sandbox, template_name):
    """`runtime` in kiln.toml: the template's sandboxes run on that runtime whatever the
    server's default is (CI runs this once with each default)."""
    plain = new_sandbox()
    default = sandbox_runtime(plain.sandbox_id)
    other = {"jail": "gvisor", "gvisor": "jail"}[default]
    (tmp_path / "Dockerfile").write_text(
        "FROM e2bdev/base\nRUN echo pinned > /opt/pinned && uname -r > /opt/built-on\n"
    )
    (tmp_path / "kiln.toml").write_text(f'name = "{template_name}"\nruntime = "{other}"\n')
    out = kiln_template_build(tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pinned = new_sandbox(template=template_name)
    assert sandbox_runtime(pinned.sandbox_id) == other
    assert probe(pinned, "cat /opt/pinned") == "pinned"
    # gVisor's kernel says so itself: its own version string, not the host's.
    kernels = {probe(plain, "uname -r"), probe(pinned, "uname -r")}
    assert len(kernels) == 2, kernels
    # The build's steps ran on the template's runtime too.
    assert probe(pinned, "cat /opt/built-on") == probe(pinned, "uname -r")

    (tmp_path / "kiln.toml").write_text('runtime = "kvm"\n')
    out = kiln_template_build(tmp_path, timeout=60)
    assert out.returncode != 0
    assert "not one of jail, gvisor" in out.stderr


def test_unknown_user_and_unreachable_image(template_name):
    with pytest.raises(BuildException) as exc:
        build(Template().from_template("base").run_cmd("true", user="root123"), template_name)
    assert "step 1" in str(exc.value)
    assert "root123" in str(exc.value)

    # Nothing listens on port 1: the pull fails at the base step, naming the registry
    # and the cause.
    with pytest.raises(BuildException) as exc:
        build(Template().from_image("127.0.0.1:1/kiln-test/none:1").run_cmd("true"), template_name)
    message = str(exc.value)
    assert "cannot pull 127.0.0.1:1/kiln-test/none:1" in message, message
    assert "registry 127.0.0.1:1 unreachable" in message, message
    assert "Connection refused" in message, message


# --- base images from a registry ---------------------------------------------------------
#
# Debian's `docker-registry` (distribution v2, installed by scripts/install-deps.sh) on a
# free 127.0.0.1 port, and a BusyBox image pushed by a tiny client of the registry's HTTP
# API. Kiln speaks plain HTTP to registries on loopback only, which this one is.

# The server runs RUN steps and the SDK runs commands with `/bin/bash -l -c`; Debian's
# BusyBox has no bash applet, so the image carries this stand-in.
BASH_WRAPPER = b'#!/bin/sh\nexec /bin/busybox sh "$@"\n'


def tar_layer(entries) -> bytes:
    """A gzip layer from (name, kind, data_or_target, mode) tuples (fixed times, so
    only what the entries hold makes the digest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            info.mode = mode
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw, gzip.compress(raw, mtime=0)


class RegistryClient:
    """Pushes blobs (monolithic upload) and manifests over the distribution v2 API."""

    def __init__(self, addr: str):
        self.base = f"http://{addr}"
        # Never through a proxy: the registry is on loopback.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _send(self, method, url, data=b"", headers=None):
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        return self.opener.open(req, timeout=30)

    def blob(self, repo: str, data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._send("POST", f"{self.base}/v2/{repo}/blobs/uploads/") as r:
            location = urljoin(self.base + "/", r.headers["Location"])
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream"}
        with self._send("PUT", f"{location}{sep}digest={digest}", data, headers) as r:
            assert r.status == 201, r.status
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, repo: str, tag: str, layers, config: dict) -> None:
        """Pushes `layers` ((raw tar, gzip) pairs) with `config` as `repo:tag`."""
        config = dict(config, rootfs={
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest() for raw, _ in layers],
        })
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.blob(repo, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
            "layers": [
                self.blob(repo, gz, "application/vnd.oci.image.layer.v1.tar+gzip") for _, gz in layers
            ],
        }
        headers = {"Content-Type": manifest["mediaType"]}
        url = f"{self.base}/v2/{repo}/manifests/{tag}"
        with self._send("PUT", url, json.dumps(manifest).encode(), headers) as r:
            assert r.status == 201, r.status


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """`host:port` of a registry holding `kiln-test/busybox:1`, unique to this run (a
    marker file keeps its digest new, so the server really pulls it)."""
    program = shutil.which("docker-registry") or shutil.which("docker-registry", path="/usr/bin:/usr/sbin")
    busybox = next((p for p in ("/usr/bin/busybox", "/bin/busybox") if os.path.isfile(p)), None)
    if not program or not busybox:
        assert not os.environ.get("CI"), "CI: docker-registry and busybox-static must be installed (scripts/install-deps.sh)"
        pytest.skip("needs docker-registry and busybox-static (scripts/install-deps.sh)")
    work = tmp_path_factory.mktemp("registry")
    addr = f"127.0.0.1:{free_port()}"
    (work / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'data'}\nhttp:\n  addr: {addr}\n  secret: kiln-e2e\n"
    )
    log = open(work / "registry.log", "wb")
    proc = subprocess.Popen([program, "serve", str(work / "config.yml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                host, port = addr.split(":")
                socket.create_connection((host, int(port)), 1).close()
                break
            except OSError:
                assert proc.poll() is None, (work / "registry.log").read_text()
                assert time.monotonic() < deadline, "docker-registry did not listen within 20 s"
                time.sleep(0.1)
        first = tar_layer([
            ("bin", "dir", None, 0o755),
            ("bin/busybox", "file", Path(busybox).read_bytes(), 0o755),
            ("bin/sh", "symlink", "busybox", 0o777),
            ("bin/bash", "file", BASH_WRAPPER, 0o755),
            ("etc", "dir", None, 0o755),
            ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
            ("etc/group", "file", b"root:x:0:\n", 0o644),
            ("etc/remove-me", "file", b"lower layer\n", 0o644),
            ("root", "dir", None, 0o700),
            ("etc/kiln-e2e-run", "file", uuid.uuid4().hex.encode(), 0o644),
        ])
        second = tar_layer([("etc/.wh.remove-me", "file", b"", 0o644)])
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/bin:/bin", "KILN_IMAGE_VAR=from-image"],
                "WorkingDir": "/srv",
            },
        }
        RegistryClient(addr).image("kiln-test/busybox", "1", [first, second], config)
        yield addr
    finally:
        stop_process(proc, 30)
        log.close()


def test_from_image_pulls_from_a_registry(registry, new_sandbox, template_name):
    image = f"{registry}/kiln-test/busybox:1"
    template = Template().from_image(image).run_cmd(
        "/bin/busybox --install -s /bin && echo built-from-$KILN_IMAGE_VAR > /srv/built.txt"
    )
    info, logs, _ = build(template, template_name)
    assert info.name == template_name
    assert any(f"pulling {image}" in m for m in logs), logs
    assert any("[base] FROM" in m and image in m for m in logs), logs

    sbx = new_sandbox(template=template_name)
    # The RUN step ran in the image, with its config's Env and WorkingDir.
    assert probe(sbx, "cat /srv/built.txt") == "built-from-from-image"
    # The second layer's whiteout deleted the first layer's file.
    assert probe(sbx, "test -e /etc/remove-me && echo present || echo gone") == "gone"
    # The image's User (none: root), WorkingDir and Env are the sandbox's defaults.
    assert probe(sbx, "whoami") == "root"
    assert probe(sbx, "pwd") == "/srv"
    assert probe(sbx, "echo $KILN_IMAGE_VAR") == "from-image"

    # Again: the image is not pulled again, and every step is a cache hit.
    _, logs2, _ = build(template, template_name)
    assert not any("pulling" in m for m in logs2), logs2
    assert any(m.startswith("[base] CACHED") for m in logs2), logs2
    steps = [m for m in logs2 if "[builder 1/1]" in m]
    assert steps and all(m.startswith("CACHED") for m in steps), logs2
