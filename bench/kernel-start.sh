#!/usr/bin/env bash
# The R and Java kernel start benchmark of docs/BENCHMARKS.md ("R and Java kernels"):
# in a fresh code-interpreter-v1 sandbox, once the JavaScript kernel's background start
# is over, the first run_code("1+1") per language (it starts the kernel) against the
# next one, a second context of that language (create_code_context), and the kernels'
# resident memory. Decides whether R and Java could start with every sandbox.
#
# Usage (root): bench/kernel-start.sh [DATA_DIR] [RUNTIME]
#               (default /var/lib/kiln-e2e jail; the data dir must hold a built
#               code-interpreter-v1, e.g. after tests/e2e/run.sh; debug build of kiln and
#               the e2e venv, tests/e2e/.venv)
# Environment: KILN_BIN (default target/x86_64-unknown-linux-gnu/debug/kiln)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA_DIR="${1:-/var/lib/kiln-e2e}"
RUNTIME="${2:-jail}"
KILN="${KILN_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/debug/kiln}"
PY="$ROOT/tests/e2e/.venv/bin/python"
ADDR="127.0.0.1:$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
KILN_API_KEY="e2b_$("$PY" -c 'import secrets; print(secrets.token_hex(20))')"
export KILN_API_KEY
LOG="$(mktemp)"

"$KILN" serve --listen "$ADDR" --data-dir "$DATA_DIR" --runtime "$RUNTIME" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -f "$LOG"' EXIT
until curl -fsS -m 2 -o /dev/null "http://$ADDR/healthz" 2>/dev/null; do
  kill -0 "$SERVER" || { cat "$LOG"; exit 1; }
  sleep 1
done
while curl -fsS -m 5 "http://$ADDR/healthz" | grep -q '"building":\["'; do sleep 2; done

echo "runtime $RUNTIME; load average $(cut -d' ' -f1-3 /proc/loadavg)"
E2B_API_URL="http://$ADDR" E2B_SANDBOX_URL="http://$ADDR" E2B_API_KEY="$KILN_API_KEY" "$PY" - <<'PYEOF'
import time
from e2b_code_interpreter import Sandbox

sbx = Sandbox.create(timeout=300)
try:
    sbx.list_code_contexts()  # waits for the JavaScript kernel's background start
    for lang in ["r", "java"]:
        t = time.monotonic(); sbx.run_code("1+1", language=lang); first = time.monotonic() - t
        t = time.monotonic(); sbx.run_code("1+1", language=lang); nxt = time.monotonic() - t
        t = time.monotonic(); sbx.create_code_context(language=lang); ctx = time.monotonic() - t
        print(f"{lang}: first run_code {first:.2f} s, next {nxt:.3f} s, another context {ctx:.2f} s")
    ps = sbx.commands.run("ps -eo rss=,args= | awk '$2 ~ /(R|java|python3|node)$/ {print $1, $2}'", user="root")
    print("RSS KiB:", ps.stdout.strip().replace("\n", "; "))
finally:
    sbx.kill()
PYEOF
