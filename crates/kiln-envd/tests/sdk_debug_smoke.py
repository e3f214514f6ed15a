"""Drive a local kiln-envd with the official E2B Python SDK (debug mode, no API server).

How to run (as root, on a machine with a user named `user` whose home is /home/user):

    python3 -m venv /tmp/envd-venv && /tmp/envd-venv/bin/pip install e2b==2.45.1
    id user || useradd -m -s /bin/bash user
    cargo build -p kiln-envd
    target/x86_64-unknown-linux-gnu/debug/kiln-envd \
        --socket /tmp/kiln-envd-smoke.sock --listen-tcp 127.0.0.1:49983 &
    E2B_DEBUG=true /tmp/envd-venv/bin/python crates/kiln-envd/tests/sdk_debug_smoke.py

With E2B_DEBUG=true, `Sandbox.create()` makes no API call and the SDK talks to envd at
http://localhost:49983 (envd version taken as 99.99.99, no access token). The script
exits non-zero on the first failed check and prints `N passed, 0 failed` at the end.
"""

import asyncio
import os
import sys
import time
import uuid

os.environ.setdefault("E2B_DEBUG", "true")

from e2b import AsyncSandbox, CommandExitException, Sandbox  # noqa: E402
from e2b.exceptions import InvalidArgumentException, NotFoundException  # noqa: E402
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402
from e2b.sandbox.filesystem.filesystem import FileType  # noqa: E402
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType  # noqa: E402

PASSED = 0


def check(name, cond, detail=""):
    global PASSED
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        print(f"{PASSED} passed, 1 failed")
        sys.exit(1)
    PASSED += 1
    print(f"ok   {name}", flush=True)


def commands(sbx: Sandbox):
    r = sbx.commands.run("echo hi; echo err >&2")
    check("run stdout", r.stdout == "hi\n", repr(r.stdout))
    check("run stderr", r.stderr == "err\n", repr(r.stderr))
    check("run exit 0", r.exit_code == 0)

    r = sbx.commands.run("whoami; echo $HOME; pwd; echo $E2B_SANDBOX")
    check("default user", r.stdout.split() == ["user", "/home/user", "/home/user", "true"], r.stdout)

    r = sbx.commands.run("whoami; pwd", user="root", cwd="/tmp")
    check("user root + cwd", r.stdout.split() == ["root", "/tmp"], r.stdout)

    r = sbx.commands.run("echo $FOO-$HOME", envs={"FOO": "bar"})
    check("envs", r.stdout == "bar-/home/user\n", r.stdout)

    try:
        sbx.commands.run("exit 3")
        check("non-zero raises", False)
    except CommandExitException as e:
        check("non-zero raises", e.exit_code == 3 and e.error == "exit status 3", str(e))

    try:
        sbx.commands.run("true", cwd="/does/not/exist")
        check("bad cwd", False)
    except InvalidArgumentException as e:
        check("bad cwd", "does not exist" in str(e), str(e))

    out, err = [], []
    r = sbx.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    check("on_stdout", "".join(out) == "out1\nout2\nout3\n", repr(out))
    check("on_stderr", "".join(err) == "err1\nerr2\nerr3\n", repr(err))

    big = sbx.commands.run("head -c 300000 /dev/zero | tr '\\0' 'x'")
    check("large output", len(big.stdout) == 300000, str(len(big.stdout)))

    # Background + stdin.
    h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
    procs = sbx.commands.list()
    check("list", any(p.pid == h.pid and p.cmd == "/bin/bash" for p in procs), str(procs))
    sbx.commands.send_stdin(h.pid, "hello\n")
    r = h.wait()
    check("send_stdin", r.stdout == "got:hello\n", repr(r.stdout))

    # close_stdin: cat ends on EOF.
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "abc")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    check("close_stdin", r.stdout == "abc", repr(r.stdout))

    # Kill.
    h = sbx.commands.run("sleep 30", background=True)
    check("kill", sbx.commands.kill(h.pid) is True)
    try:
        h.wait()
        check("killed wait raises", False)
    except CommandExitException as e:
        check("killed wait raises", e.exit_code == -1 and "killed" in (e.error or ""), str(e))
    check("kill unknown pid", sbx.commands.kill(999999) is False)

    # Disconnect + connect.
    h = sbx.commands.run("sleep 1; echo later", background=True)
    h.disconnect()
    h2 = sbx.commands.connect(h.pid)
    r = h2.wait()
    check("connect", r.stdout == "later\n", repr(r.stdout))

    # Timeout = lifetime.
    t0 = time.time()
    try:
        sbx.commands.run("sleep 10", timeout=1)
        check("timeout kills", False)
    except Exception as e:  # TimeoutException or CommandExitException
        check("timeout raises", time.time() - t0 < 5, f"{type(e).__name__}: {e}")
    # ...and envd killed the process at the deadline (it never writes its marker).
    marker = f"/tmp/kiln-smoke-marker-{uuid.uuid4().hex[:8]}"
    sbx.commands.run(f"sleep 2; touch {marker}", background=True, timeout=1)
    time.sleep(3.5)
    check("timeout kills process", not sbx.files.exists(marker))


def pty(sbx: Sandbox):
    chunks = []
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    time.sleep(0.5)
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; tty; exit\n")
    h.wait(on_pty=lambda data: chunks.append(bytes(data)))
    text = b"".join(chunks).decode(errors="replace")
    check("pty initial size", "24 80" in text, repr(text[-400:]))
    check("pty resize", "30 100" in text, repr(text[-400:]))
    check("pty tty", "/dev/pts/" in text, repr(text[-400:]))

    h = sbx.pty.create(PtySize(rows=24, cols=80))
    check("pty kill", sbx.pty.kill(h.pid) is True)


def files(sbx: Sandbox):
    d = f"/tmp/kiln-smoke-{uuid.uuid4().hex[:8]}"
    info = sbx.files.write(f"{d}/a.txt", "hello")
    check("write text", info.path == f"{d}/a.txt" and info.name == "a.txt", str(info))
    check("read text", sbx.files.read(f"{d}/a.txt") == "hello")
    sbx.files.write(f"{d}/b.bin", b"\x00\x01\xff")
    check("read bytes", bytes(sbx.files.read(f"{d}/b.bin", format="bytes")) == b"\x00\x01\xff")
    sbx.files.write("rel.txt", "in home")
    check("relative path -> home", sbx.files.read("/home/user/rel.txt") == "in home")
    r = sbx.commands.run("stat -c %U /home/user/rel.txt")
    check("upload owned by user", r.stdout.strip() == "user", r.stdout)
    sbx.files.write(f"{d}/root.txt", "r", user="root")
    check("read as root", sbx.files.read(f"{d}/root.txt", user="root") == "r")
    try:
        sbx.files.read(f"{d}/missing")
        check("read missing", False)
    except NotFoundException:
        check("read missing", True)

    import io

    sbx.files.write(f"{d}/gz.txt", "zipped " * 1000, gzip=True)
    check("write gzip", sbx.files.read(f"{d}/gz.txt", gzip=True) == "zipped " * 1000)
    sbx.files.write(f"{d}/stream.bin", io.BytesIO(b"streamed bytes"))
    check("write file object (octet-stream)", sbx.files.read(f"{d}/stream.bin") == "streamed bytes")
    chunks = b"".join(sbx.files.read(f"{d}/stream.bin", format="stream"))
    check("read stream", chunks == b"streamed bytes")
    sbx.files.write(f"{d}/meta.txt", "m", metadata={"Owner": "alice"})
    gi = sbx.files.get_info(f"{d}/meta.txt")
    if gi.metadata is None:
        print("note: no user xattrs on this filesystem; metadata not checked")
    else:
        check("metadata round trip", gi.metadata == {"owner": "alice"}, str(gi.metadata))

    many = sbx.files.write_files([
        {"path": f"{d}/m/1.txt", "data": "one"},
        {"path": f"{d}/m/2.txt", "data": b"two"},
    ])
    check("write_files", sorted(i.path for i in many) == [f"{d}/m/1.txt", f"{d}/m/2.txt"], str(many))

    check("exists yes", sbx.files.exists(f"{d}/a.txt") is True)
    check("exists no", sbx.files.exists(f"{d}/nope") is False)
    gi = sbx.files.get_info(f"{d}/a.txt")
    check("get_info", gi.type == FileType.FILE and gi.size == 5 and gi.permissions.startswith("-rw"), str(gi))

    check("make_dir", sbx.files.make_dir(f"{d}/sub/deep") is True)
    check("make_dir exists", sbx.files.make_dir(f"{d}/sub/deep") is False)

    entries = sbx.files.list(d)
    names = sorted(e.name for e in entries)
    check(
        "list depth 1",
        names == ["a.txt", "b.bin", "gz.txt", "m", "meta.txt", "root.txt", "stream.bin", "sub"],
        str(names),
    )
    entries = sbx.files.list(d, depth=3)
    paths = sorted(e.path for e in entries)
    check("list depth 3", f"{d}/sub/deep" in paths and f"{d}/m/1.txt" in paths, str(paths))

    moved = sbx.files.rename(f"{d}/a.txt", f"{d}/renamed/a2.txt")
    check("rename", moved.path == f"{d}/renamed/a2.txt" and sbx.files.read(moved.path) == "hello")

    sbx.files.remove(f"{d}/renamed")
    check("remove", sbx.files.exists(f"{d}/renamed") is False)
    sbx.files.remove(f"{d}/never-existed")
    check("remove missing ok", True)

    w = sbx.files.watch_dir(d)
    sbx.files.write(f"{d}/watched.txt", "x")
    sbx.files.remove(f"{d}/watched.txt")
    time.sleep(0.5)
    events = w.get_new_events()
    w.stop()
    kinds = [(e.name, e.type) for e in events]
    check("watch_dir create", ("watched.txt", FilesystemEventType.CREATE) in kinds, str(kinds))
    check("watch_dir remove", ("watched.txt", FilesystemEventType.REMOVE) in kinds, str(kinds))

    w = sbx.files.watch_dir(d, recursive=True)
    sbx.files.write(f"{d}/sub/deep/r.txt", "x")
    time.sleep(0.5)
    events = w.get_new_events()
    w.stop()
    check("watch_dir recursive", any(e.name == "sub/deep/r.txt" for e in events), str(events))
    sbx.files.remove(d)


async def async_watch():
    sbx = await AsyncSandbox.create()
    d = f"/tmp/kiln-smoke-async-{uuid.uuid4().hex[:8]}"
    await sbx.files.make_dir(d)
    seen = []
    handle = await sbx.files.watch_dir(d, on_event=lambda e: seen.append(e), include_entry=True)
    await sbx.files.write(f"{d}/x.txt", "hi")
    for _ in range(50):
        if any(e.name == "x.txt" for e in seen):
            break
        await asyncio.sleep(0.1)
    await handle.stop()
    check("async watch_dir", any(e.name == "x.txt" for e in seen), str(seen))
    created = [e for e in seen if e.type == FilesystemEventType.CREATE]
    check("async watch include_entry", created and created[0].entry is not None, str(created))
    r = await sbx.commands.run("echo async")
    check("async run", r.stdout == "async\n")
    await sbx.files.remove(d)


def main():
    sbx = Sandbox.create()
    check("is_running", sbx.is_running())
    commands(sbx)
    pty(sbx)
    files(sbx)
    asyncio.run(async_watch())
    print(f"{PASSED} passed, 0 failed", flush=True)
    # The SDK's native HTTP transport can crash the interpreter at shutdown; skip it.
    os._exit(0)


if __name__ == "__main__":
    main()
