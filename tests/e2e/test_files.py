"""Files through envd's /files upload and download and the filesystem service."""

import asyncio
import hashlib
import os
import socket
import time

import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

from helpers import probe, probe_exit, wait_until


def test_write_and_read_text(sbx, uniq):
    text = f"héllo wörld {uniq}\nsecond line\n"
    info = sbx.files.write(f"e2e-{uniq}/nested/hello.txt", text)
    assert info.path == f"/home/user/e2e-{uniq}/nested/hello.txt"
    assert info.name == "hello.txt"
    assert info.type == FileType.FILE
    assert sbx.files.read(info.path) == text
    assert sbx.files.read(f"e2e-{uniq}/nested/hello.txt") == text  # relative to home
    # From inside: the bytes, and the owner (the default user, parents included).
    assert probe(sbx, f"cat {info.path}") == text.rstrip("\n")
    assert probe(sbx, f"stat -c %U {info.path} /home/user/e2e-{uniq}/nested") == "user\nuser"
    # Overwrite.
    sbx.files.write(info.path, "short")
    assert sbx.files.read(info.path) == "short"


def test_write_and_read_binary(sbx, uniq):
    data = bytes(range(256)) * 257
    path = f"/tmp/bin-{uniq}.dat"
    sbx.files.write(path, data)
    assert bytes(sbx.files.read(path, format="bytes")) == data


    assert probe(sbx, f"sha256sum {path} | cut -d' ' -f1") == hashlib.sha256(data).hexdigest()
    assert probe(sbx, f"stat -c %s {path}") == str(len(data))
    # Streamed read.
    assert b"".join(sbx.files.read(path, format="stream")) == data


def test_write_as_root(sbx, uniq):
    path = f"/root-only-{uniq}.txt"
    sbx.files.write(path, "root wrote this", user="root")
    assert probe(sbx, f"stat -c %U:%G {path}") == "root:root"
    assert sbx.files.read(path, user="root") == "root wrote this"


def test_write_files_multiple(sbx, uniq):
    base = f"/tmp/multi-{uniq}"
    infos = sbx.files.write_files(
        [
            WriteEntry(path=f"{base}/one.txt", data="1"),
            WriteEntry(path=f"{base}/sub/two.bin", data=b"\x00\x02"),
            WriteEntry(path=f"{base}/three.txt", data="three"),
        ]
    )
    assert sorted(i.path for i in infos) == sorted(
        [f"{base}/one.txt", f"{base}/sub/two.bin", f"{base}/three.txt"]
    )
    assert probe(sbx, f"cat {base}/one.txt {base}/three.txt") == "1three"
    assert probe(sbx, f"od -An -tx1 {base}/sub/two.bin").split() == ["00", "02"]


def test_list_with_depth(sbx, uniq):
    root = f"/tmp/list-{uniq}"
    probe(sbx, f"mkdir -p {root}/a/b && echo x > {root}/a/b/f && echo y > {root}/top")
    shallow = sbx.files.list(root)
    assert sorted((e.name, e.type) for e in shallow) == [
        ("a", FileType.DIR),
        ("top", FileType.FILE),
    ]
    deep = sbx.files.list(root, depth=3)
    assert sorted(e.path for e in deep) == [
        f"{root}/a",
        f"{root}/a/b",
        f"{root}/a/b/f",
        f"{root}/top",
    ]
    with pytest.raises(NotFoundException):
        sbx.files.list(f"{root}/missing")


def test_get_info_exists_and_stat(sbx, uniq):
    path = f"/tmp/info-{uniq}.txt"
    sbx.files.write(path, "12345")
    probe(sbx, f"chmod 640 {path}")
    info = sbx.files.get_info(path)
    assert info.name == f"info-{uniq}.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.mode & 0o777 == 0o640
    assert info.permissions == "-rw-r-----"
    assert info.owner == "user" and info.group == "user"
    assert abs(info.modified_time.timestamp() - time.time()) < 120
    assert sbx.files.get_info("/tmp").type == FileType.DIR
    assert sbx.files.exists(path) is True
    assert sbx.files.exists(f"/tmp/nope-{uniq}") is False
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info(f"/tmp/nope-{uniq}")


def test_rename_remove_make_dir(sbx, uniq):
    src, dst = f"/tmp/ren-{uniq}.txt", f"/tmp/ren-{uniq}/moved.txt"
    sbx.files.write(src, "move me")
    moved = sbx.files.rename(src, dst)
    assert moved.path == dst
    assert sbx.files.exists(src) is False
    assert probe(sbx, f"cat {dst}") == "move me"

    sbx.files.remove(f"/tmp/ren-{uniq}")  # recursive
    assert sbx.files.exists(dst) is False
    assert probe(sbx, f"test -e /tmp/ren-{uniq} && echo yes || echo no") == "no"
    sbx.files.remove(f"/tmp/ren-{uniq}")  # missing is fine

    d = f"/tmp/mk-{uniq}/x/y"
    assert sbx.files.make_dir(d) is True
    assert sbx.files.make_dir(d) is False
    assert probe(sbx, f"stat -c %F:%U {d}") == "directory:user"


def test_read_missing_file(sbx, uniq):
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"/tmp/missing-{uniq}")


def test_watch_dir_sync(sbx, uniq):
    d = f"/tmp/watch-{uniq}"
    sbx.files.make_dir(d)
    handle = sbx.files.watch_dir(d)
    try:
        sbx.files.write(f"{d}/new.txt", "hello")
        probe(sbx, f"echo more >> {d}/new.txt; rm {d}/new.txt")
        events = []

        def seen_remove():
            events.extend(handle.get_new_events())
            return any(e.type == FilesystemEventType.REMOVE for e in events)

        assert wait_until(seen_remove, timeout=10, interval=0.3), events
        kinds = [(e.name, e.type) for e in events]
        assert ("new.txt", FilesystemEventType.CREATE) in kinds
        assert ("new.txt", FilesystemEventType.WRITE) in kinds
        assert ("new.txt", FilesystemEventType.REMOVE) in kinds
    finally:
        handle.stop()


def test_watch_dir_async_callback(sbx, uniq):
    d = f"/tmp/awatch-{uniq}"
    sbx.files.make_dir(d)

    async def run():
        asbx = await AsyncSandbox.connect(sbx.sandbox_id)
        got = []
        arrived = asyncio.Event()

        def on_event(e):
            got.append(e)
            if e.name == "a.txt" and e.type == FilesystemEventType.WRITE:
                arrived.set()

        handle = await asbx.files.watch_dir(d, on_event=on_event, timeout=30)
        try:
            await asbx.files.write(f"{d}/a.txt", "async")
            await asyncio.wait_for(arrived.wait(), timeout=10)
        finally:
            await handle.stop()
        return got

    got = asyncio.run(run())
    assert ("a.txt", FilesystemEventType.CREATE) in [(e.name, e.type) for e in got]


def _read_response(sock) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return buf
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return head + b"\r\n\r\n" + body


def test_chunked_multipart_upload_on_keepalive_connection(sbx, uniq):
    """The JS SDK (undici) uploads multipart bodies chunked, in several TCP writes, on a
    kept-alive connection, each chunk's CRLF riding with the next write. Every such
    upload must succeed (raw HTTP, so the framing is exactly undici's)."""
    url = os.environ["E2B_SANDBOX_URL"].split("//", 1)[1].rstrip("/")
    host, port = url.rsplit(":", 1)
    boundary = b"----kiln-e2e-" + uniq.encode()
    def connect():
        # Like node: no Nagle, so each write is its own TCP segment.
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    sock = connect()
    failures = []
    try:
        for i in range(20):
            path = f"/tmp/chunked-{uniq}-{i}"
            part = (
                b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
                b'filename="' + path.encode() + b'"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n"
            )
            head = (
                f"POST /files?path={path} HTTP/1.1\r\nHost: {url}\r\nConnection: keep-alive\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n"
                f"E2b-Sandbox-Id: {sbx.sandbox_id}\r\nE2b-Sandbox-Port: 49983\r\n"
                f"X-Access-Token: {sbx._envd_access_token}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            try:
                sock.sendall(head + b"%x\r\n" % len(part) + part)
                for piece in (bytes([i]) * 256, b"\r\n", b"--" + boundary + b"--\r\n"):
                    time.sleep(0.001)
                    sock.sendall(b"\r\n%x\r\n" % len(piece) + piece)
                time.sleep(0.001)
                sock.sendall(b"\r\n0\r\n\r\n")
                resp = _read_response(sock)
            except OSError as e:
                # The server closed the kept-alive connection under a request.
                failures.append((i, f"connection error: {e!r}", b""))
                sock.close()
                sock = connect()
                continue
            status = resp.split(b"\r\n", 1)[0].decode(errors="replace")
            if not status.endswith("200 OK"):
                failures.append((i, status, resp.rsplit(b"\r\n\r\n", 1)[-1][:200]))
                sock.close()
                sock = connect()
    finally:
        sock.close()
    assert not failures, failures
    assert probe(sbx, f"cat /tmp/chunked-{uniq}-7 | od -An -tx1 | head -1").split()[0] == "07"


def test_reading_a_kernel_file_gives_what_cat_prints(sbx):
    # procfs files say their size is 0: the whole content still comes back.
    via_files = sbx.files.read("/proc/self/status")
    assert via_files.startswith("Name:"), via_files[:80]
    version = sbx.files.read("/proc/version")
    assert version.strip() == sbx.commands.run("cat /proc/version").stdout.strip()


def test_download_reads_to_eof_and_refuses_special_files(sbx, uniq):
    # Kernel files read to their end whatever size they claim (procfs 0, sysfs a page);
    # gVisor lists /proc/filesystems in no fixed order, so lines are compared as sets.
    for path in ("/proc/version", "/proc/filesystems", "/sys/devices/system/cpu/online"):
        if probe_exit(sbx, f"test -r {path}") != 0:
            continue
        via_files = sbx.files.read(path).splitlines()
        assert via_files, path
        assert sorted(via_files) == sorted(probe(sbx, f"cat {path}").splitlines()), path
    # A file longer than envd reads ahead streams to its end (chunked).
    big = f"/tmp/big-{uniq}.bin"
    probe(sbx, f"head -c 300000 /dev/urandom > {big}")
    data = sbx.files.read(big, format="bytes")
    assert hashlib.sha256(data).hexdigest() == probe(sbx, f"sha256sum {big}").split()[0]
    # Devices and FIFOs are refused at once, naming the type: /dev/zero never ends and
    # a FIFO's open waits for a writer.
    fifo = f"/tmp/fifo-{uniq}"
    probe(sbx, f"mkfifo {fifo}")
    for path, kind in (("/dev/zero", "a character device"), (fifo, "a FIFO")):
        with pytest.raises(InvalidArgumentException) as exc:
            sbx.files.read(path, request_timeout=20)
        assert f"is {kind}" in str(exc.value), exc.value


def test_file_metadata_is_kept_listed_renamed_and_dropped(sbx, uniq):
    # gVisor's root filesystem refuses user.* attributes; envd keeps them in a store of
    # its own there, so both runtimes answer the same.
    d = f"/home/user/meta-{uniq}"
    path = f"{d}/a.txt"
    info = sbx.files.write(path, "hello", metadata={"Owner": "ann", "kind": "note"})
    assert info.metadata == {"owner": "ann", "kind": "note"}
    assert sbx.files.get_info(path).metadata == {"owner": "ann", "kind": "note"}
    listed = {e.name: e for e in sbx.files.list(d)}
    assert listed["a.txt"].metadata == {"owner": "ann", "kind": "note"}

    moved = sbx.files.rename(path, f"{d}/b.txt")
    assert moved.metadata == {"owner": "ann", "kind": "note"}
    assert sbx.files.get_info(f"{d}/b.txt").metadata == {"owner": "ann", "kind": "note"}

    # Content written by a process keeps it; a new upload without metadata clears it.
    sbx.commands.run(f"echo more >> {d}/b.txt")
    assert sbx.files.get_info(f"{d}/b.txt").metadata == {"owner": "ann", "kind": "note"}
    sbx.files.write(f"{d}/b.txt", "again")
    assert not sbx.files.get_info(f"{d}/b.txt").metadata

    sbx.files.write(f"{d}/c.txt", "x", metadata={"owner": "bob"})
    sbx.files.remove(f"{d}/c.txt")
    sbx.commands.run(f"echo fresh > {d}/c.txt")
    assert not sbx.files.get_info(f"{d}/c.txt").metadata
