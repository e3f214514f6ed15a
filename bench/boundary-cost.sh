#!/usr/bin/env bash
# What the host-guest boundary fixes cost (docs/BENCHMARKS.md, "The boundary's cost"):
# create p50/p99 with and without a warm pool, and the `commands.run("true")` round
# trip, for a release build of BEFORE (a commit without the fixes) and of the working
# tree, on the jail and on gVisor, in one run: for each runtime the two builds are
# measured back to back on the same data directory and `base` template.
#
# Usage (root): bench/boundary-cost.sh BEFORE_COMMIT [DATA_DIR]   (default /var/lib/kiln-e2e)
# Environment: KILN_BENCH_CREATES (40), KILN_BENCH_ROUND_TRIPS (100),
#              KILN_BENCH_RUNTIMES ("jail gvisor"), KILN_BENCH_SKIP_BUILD=1
# The BEFORE build lives in a git worktree at target/bench-before (its own target dir).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BEFORE="${1:?usage: bench/boundary-cost.sh BEFORE_COMMIT [DATA_DIR]}"
DATA_DIR="${2:-/var/lib/kiln-e2e}"
CREATES="${KILN_BENCH_CREATES:-40}"
ROUND_TRIPS="${KILN_BENCH_ROUND_TRIPS:-100}"
RUNTIMES="${KILN_BENCH_RUNTIMES:-jail gvisor}"
WORKTREE="$ROOT/target/bench-before"
ADDR=127.0.0.1:3916
export E2B_API_URL="http://$ADDR"
export E2B_API_KEY="e2b_$(python3 -c 'import secrets; print(secrets.token_hex(20))')"
SERVER_PID=""

stop() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap stop EXIT

if [ "${KILN_BENCH_SKIP_BUILD:-0}" != 1 ]; then
  if [ ! -d "$WORKTREE" ]; then
    git -C "$ROOT" worktree add --detach "$WORKTREE" "$BEFORE"
  fi
  git -C "$WORKTREE" checkout -q --detach "$BEFORE"
  (cd "$WORKTREE" && CARGO_TARGET_DIR="$WORKTREE/target" cargo build --release --bins)
  (cd "$ROOT" && cargo build --release --bins)
fi
[ -d "$DATA_DIR/templates/base/rootfs" ] || {
  echo "no base template in $DATA_DIR (run tests/e2e/run.sh or kiln serve once)" >&2
  exit 1
}
declare -A REL=(
  [before]="$WORKTREE/target/x86_64-unknown-linux-gnu/release"
  [after]="$ROOT/target/x86_64-unknown-linux-gnu/release"
)
LOG="$(mktemp /tmp/kiln-bench-boundary.XXXXXX.log)"

serve() { # build runtime pool-size
  KILN_API_KEY="$E2B_API_KEY" "${REL[$1]}/kiln" serve --listen "$ADDR" --data-dir "$DATA_DIR" \
    --runtime "$2" --pool-size "$3" --builtin-templates none >>"$LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    curl -fsS -o /dev/null -m 2 "$E2B_API_URL/healthz" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$LOG"; exit 1; }
    sleep 0.5
  done
  [ "$3" = 0 ] || sleep 10 # the warm pool fills
}

# The same kiln-bench (the working tree's) measures both servers.
bench() { "${REL[after]}/kiln-bench" --template base "$@"; }

echo "before $(git -C "$WORKTREE" rev-parse --short HEAD), after $(git -C "$ROOT" rev-parse --short HEAD) (+ working tree)," \
  "$(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "server log: $LOG"
for rt in $RUNTIMES; do
  for build in before after; do
    echo
    echo "## $rt, $build, no pool"
    serve "$build" "$rt" 0
    bench --creates "$CREATES" --round-trips "$ROUND_TRIPS"
    stop
    echo
    echo "## $rt, $build, warm pool of 2 (2 s between creates)"
    serve "$build" "$rt" 2
    bench --creates "$CREATES" --round-trips 20 --create-interval-ms 2000
    stop
  done
done
