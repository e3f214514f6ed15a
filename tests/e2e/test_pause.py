"""Pause and resume with the SDK: `sbx.pause()` then `Sandbox.connect(id)`.

On the jail runtime a pause freezes the sandbox's cgroup; on gVisor it checkpoints the
sandbox to disk and the resume restores it. Either way processes stop where they are and
keep their memory, so a counting background process goes on from where it stood.
"""

import time

from e2b import Sandbox, SandboxQuery, SandboxState

from helpers import read_counter, start_counter, wait_until


def test_pause_keeps_processes_and_memory(new_sandbox):
    sbx = new_sandbox()
    # A shell variable (process memory) counts; the file only reports it.
    start_counter(sbx)
    time.sleep(0.5)
    assert read_counter(sbx) > 0

    assert sbx.pause() is True
    assert sbx.pause() is False, "a second pause reports 'already paused'"
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.state == SandboxState.PAUSED
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in paused]

    resumed = Sandbox.connect(sbx.sandbox_id)
    at_resume = read_counter(resumed)
    time.sleep(0.5)
    after = read_counter(resumed)
    assert after > at_resume, "the counting process did not go on after resume"
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    assert resumed.commands.run("echo alive").stdout.strip() == "alive"


def test_timeout_pauses_when_the_create_asked_for_it(new_sandbox):
    """`lifecycle={"on_timeout": "pause"}` (the API's autoPause): at its deadline the
    sandbox is paused, not killed, and `Sandbox.connect` picks it up with its process
    and memory."""
    sbx = new_sandbox(timeout=6, lifecycle={"on_timeout": "pause"})
    start_counter(sbx)
    sbx.files.write("/home/user/note.txt", "kept")
    assert wait_until(
        lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, 30
    ), "the sandbox was not paused at its deadline"
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
    at_resume = read_counter(resumed)
    time.sleep(0.5)
    assert read_counter(resumed) > at_resume, "the counting process did not go on"
    assert resumed.files.read("/home/user/note.txt") == "kept"
