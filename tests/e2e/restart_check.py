"""Restart check, run by run.sh around a stop and start of `kiln serve`.

`before`: create a long-lived sandbox with a file, an environment variable and a
background process, a short-lived one, and a paused one with a counting process; print
their ids as JSON.
`after` (state on stdin): the long-lived sandbox was re-adopted (same file, same env,
the background process still running, commands work), the short-lived one is killed at
its deadline by the restarted server, and the paused one resumes and counts on.
"""

import json
import os
import sys
import time

from e2b import Sandbox
from e2b.exceptions import NotFoundException, SandboxException

from helpers import read_counter, start_counter

SHORT_TIMEOUT = 15
# Pause keeps the sandbox's memory on every runtime: the jail freezes its cgroup, gVisor
# checkpoints it to disk (docs/gvisor.md, "Pause and resume").
PAUSE = os.environ.get("KILN_E2E_RUNTIME", "jail") in ("", "jail", "gvisor", "auto")


def before() -> None:
    keep = Sandbox.create(timeout=300, envs={"KEEP": "yes"}, metadata={"e2e": "restart"})
    keep.files.write("/home/user/survivor.txt", "still here")
    bg = keep.commands.run("sleep 600", background=True, timeout=0)
    short = Sandbox.create(timeout=SHORT_TIMEOUT, metadata={"e2e": "restart"})
    paused = Sandbox.create(timeout=300, metadata={"e2e": "restart"}) if PAUSE else None
    if paused:
        start_counter(paused)
        time.sleep(0.3)
        assert paused.pause() is True
    json.dump(
        {
            "keep": keep.sandbox_id,
            "pid": bg.pid,
            "short": short.sandbox_id,
            "paused": paused.sandbox_id if paused else None,
            "t": time.time(),
        },
        sys.stdout,
    )


def after() -> None:
    state = json.load(sys.stdin)
    keep = Sandbox.connect(state["keep"])
    assert keep.files.read("/home/user/survivor.txt") == "still here"
    assert keep.commands.run("echo $KEEP").stdout.strip() == "yes"
    pids = [p.pid for p in keep.commands.list()]
    assert state["pid"] in pids, f"background process {state['pid']} gone after restart: {pids}"
    assert keep.commands.run(f"kill -0 {state['pid']} && echo alive").stdout.strip() == "alive"

    short_id = state["short"]
    deadline = state["t"] + SHORT_TIMEOUT + 10
    while True:
        try:
            Sandbox.get_info(short_id)
        except (NotFoundException, SandboxException) as e:
            assert "404" in str(e) or isinstance(e, NotFoundException), e
            break
        assert time.time() < deadline, "the short-lived sandbox outlived its deadline after a restart"
        time.sleep(1)
    if state["paused"]:
        paused = Sandbox.connect(state["paused"])
        first = read_counter(paused)
        time.sleep(0.3)
        assert read_counter(paused) > first, "did not resume"
        paused.kill()
    keep.kill()
    print(
        "restart check passed: re-adopted",
        state["keep"],
        "expired",
        short_id,
        "resumed",
        state["paused"],
    )


if __name__ == "__main__":
    {"before": before, "after": after}[sys.argv[1]]()
