#!/usr/bin/env bash
# The runtime benchmarks of docs/BENCHMARKS.md ("Runtimes"): for the jail and gVisor,
# create → first output with and without a warm pool, `commands.run("true")`, a
# syscall-heavy command beside the host, host memory per idle sandbox, pause/resume
# against memory held. Each runtime gets its own `kiln serve` (release build) on a data
# directory whose `base` template is already built; every table has its floor.
#
# Usage (root): bench/runtimes.sh [DATA_DIR]   (default /var/lib/kiln-e2e)
# Environment: KILN_BENCH_CREATES (50), KILN_BENCH_ROUND_TRIPS (200),
#              KILN_BENCH_RUNTIMES ("jail gvisor"), KILN_BENCH_SKIP_BUILD=1
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA_DIR="${1:-/var/lib/kiln-e2e}"
CREATES="${KILN_BENCH_CREATES:-50}"
ROUND_TRIPS="${KILN_BENCH_ROUND_TRIPS:-200}"
RUNTIMES="${KILN_BENCH_RUNTIMES:-jail gvisor}"
REL="$ROOT/target/x86_64-unknown-linux-gnu/release"
ADDR=127.0.0.1:3915
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

serve() { # runtime pool-size
  KILN_API_KEY="$E2B_API_KEY" "$REL/kiln" serve --listen "$ADDR" --data-dir "$DATA_DIR" \
    --runtime "$1" --pool-size "$2" --builtin-templates none >>"$LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    curl -fsS -o /dev/null -m 2 "$E2B_API_URL/healthz" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$LOG"; exit 1; }
    sleep 0.5
  done
  # Let the warm pool fill.
  [ "$2" = 0 ] || sleep 10
}

bench() { "$REL/kiln-bench" --template base "$@"; }

if [ "${KILN_BENCH_SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release --bins)
fi
[ -d "$DATA_DIR/templates/base/rootfs" ] || {
  echo "no base template in $DATA_DIR (run tests/e2e/run.sh or kiln serve once)" >&2
  exit 1
}
LOG="$(mktemp /tmp/kiln-bench-serve.XXXXXX.log)"
echo "commit $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "server log: $LOG"

for rt in $RUNTIMES; do
  floor=()
  if [ "$rt" = gvisor ]; then
    floor=(--create-floor "runsc --root=/tmp/kiln-bench-runsc --network=none do /bin/true")
  fi
  echo
  echo "## $rt, no pool"
  serve "$rt" 0
  bench --creates "$CREATES" --round-trips "$ROUND_TRIPS" "${floor[@]}"
  echo
  bench --suite syscalls --round-trips 20 --floor-dir "$DATA_DIR/templates/base/rootfs/usr"
  echo
  bench --suite memory --creates 20
  echo
  bench --suite pause
  stop

  echo
  echo "## $rt, warm pool of 2 (2 s between creates: the last sandbox's kill and the refill finish)"
  serve "$rt" 2
  bench --creates "$CREATES" --round-trips 50 --create-interval-ms 2000
  stop
done
