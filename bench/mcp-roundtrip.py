"""MCP `run_code("1+1")` on a live sandbox beside the same call through the SDK, in one
run against one server (issue 16's benchmark).

Run with the e2e venv's Python (it has `e2b-code-interpreter` and `mcp`), against a
running `kiln serve` whose `code-interpreter-v1` is built:

    E2B_API_URL=... E2B_SANDBOX_URL=... E2B_API_KEY=... \\
      tests/e2e/.venv/bin/python bench/mcp-roundtrip.py [--rounds 50] [--kiln PATH]

Both paths use the same sandbox and the same warm kernel. The SDK path is the floor:
HTTP to Kiln's proxy, the interpreter, back. The MCP path adds `kiln mcp` (stdio JSON-RPC,
then the same HTTP call through kiln-client).
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import anyio
from e2b_code_interpreter import Sandbox
from mcp import Client, StdioServerParameters


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def report(name, samples):
    ms = [x * 1000 for x in samples]
    print(f"{name:<28} p50 {pct(ms, 50):7.2f} ms  p99 {pct(ms, 99):7.2f} ms  "
          f"mean {statistics.mean(ms):7.2f} ms  (n={len(ms)})")


async def via_mcp(kiln, sandbox_id, rounds):
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    params = StdioServerParameters(command=kiln, args=["mcp"], env=env)
    out = []
    async with Client(params) as client:
        args = {"code": "1+1", "sandbox_id": sandbox_id}
        first = await client.call_tool("run_code", args)  # warm-up
        assert not first.is_error, first
        for _ in range(rounds):
            t = time.perf_counter()
            r = await client.call_tool("run_code", args)
            out.append(time.perf_counter() - t)
            assert r.structured_content["text"] == "2", r
    return out


def main():
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--kiln", default=str(root / "target/x86_64-unknown-linux-gnu/debug/kiln"))
    a = ap.parse_args()
    sbx = Sandbox.create(timeout=600)
    try:
        assert sbx.run_code("1+1").text == "2"  # warm-up
        sdk = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            r = sbx.run_code("1+1")
            sdk.append(time.perf_counter() - t)
            assert r.text == "2"
        mcp = anyio.run(via_mcp, a.kiln, sbx.sandbox_id, a.rounds)
        report("SDK run_code('1+1')", sdk)
        report("MCP run_code('1+1')", mcp)
    finally:
        sbx.kill()


if __name__ == "__main__":
    main()
