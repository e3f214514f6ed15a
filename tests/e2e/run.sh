#!/usr/bin/env bash
# End-to-end suite: starts a real `kiln serve`, points the official E2B SDKs at it
# (Python e2b==2.45.1 with pytest, JS e2b 2.45.0 with node --test), then stops it and
# fails if any sandbox process, mount or directory is left behind.
#
# Privilege tier: root (both runtimes), network to PyPI/npm for the first setup and
# to a Debian mirror for the first base-template build (~2 min, cached in the data dir).
#
# Usage: tests/e2e/run.sh [pytest args...]      e.g. tests/e2e/run.sh -k files
# Environment:
#   KILN_E2E_DATA_DIR        data dir (default /var/lib/kiln-e2e; kept, so the base
#                            template is built once)
#   KILN_BIN                 the kiln CLI the tests call (default target/x86_64-unknown-linux-gnu/debug/kiln);
#                            the server itself is started with scripts/serve, as the README says
#   KILN_E2E_SERVER_BIN      start this kiln binary as the server instead of scripts/serve
#   KILN_E2E_SKIP_BUILD=1    do not run `cargo build` first
#   KILN_E2E_SKIP_JS=1       skip the JS SDK test
#   KILN_E2E_RUNTIME         passed as --runtime (default: the server's default, auto)
#   KILN_E2E_EXPECT_RUNTIME  fail unless the start banner names this runtime (e.g. gvisor:
#                            proves that `auto` picked it)
#   KILN_E2E_HEALTH_TIMEOUT  seconds to wait for /healthz (default 900)
#   KILN_E2E_BUILTIN_TIMEOUT seconds to wait for the built-in templates the server builds
#                            in the background (code-interpreter-v1, and desktop when
#                            KILN_BUILTIN_TEMPLATES names it; default 1800: the first
#                            build installs the data stack from PyPI, desktop ~1 GB of
#                            Debian packages)
#   KILN_BUILTIN_TEMPLATES   passed to the server as is (e.g. code-interpreter-v1,desktop:
#                            test_desktop.py skips when the server has no desktop
#                            template, and fails instead when this names desktop)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DATA_DIR="${KILN_E2E_DATA_DIR:-/var/lib/kiln-e2e}"
KILN_BIN="${KILN_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/debug/kiln}"
HEALTH_TIMEOUT="${KILN_E2E_HEALTH_TIMEOUT:-900}"
BUILTIN_TIMEOUT="${KILN_E2E_BUILTIN_TIMEOUT:-1800}"
LOG_DIR="$HERE/.logs"
SERVER_LOG="$LOG_DIR/serve-$(date -u +%Y%m%dT%H%M%SZ)-$$.log"
SERVER_PID=""

log() { printf '\n=== %s\n' "$*" >&2; }
die() { printf '\nE2E FAILED: %s\n' "$*" >&2; exit 1; }

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "kiln serve (pid $SERVER_PID) ignored SIGTERM for 30 s; sending SIGKILL" >&2
      kill -KILL "$SERVER_PID" 2>/dev/null || true
      SERVER_STOP_FAILED=1
    fi
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
SERVER_STOP_FAILED=0
NATS_PID=""
EGRESS_CA_DIR=""
stop_all() {
  stop_server
  if [ -n "$NATS_PID" ]; then
    kill "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
  fi
  [ -z "$EGRESS_CA_DIR" ] || rm -rf "$EGRESS_CA_DIR"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# --- setup -----------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (the jail runtime needs it)"

log "python venv ($HERE/.venv)"
if [ ! -x "$HERE/.venv/bin/python" ]; then
  python3 -m venv "$HERE/.venv"
fi
REQ_STAMP="$HERE/.venv/.requirements.sha256"
REQ_SUM="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$REQ_STAMP" 2>/dev/null || true)" != "$REQ_SUM" ]; then
  "$HERE/.venv/bin/pip" install --disable-pip-version-check -q -r "$HERE/requirements.txt"
  echo "$REQ_SUM" >"$REQ_STAMP"
fi

if [ "${KILN_E2E_SKIP_JS:-0}" != 1 ]; then
  log "npm ci ($HERE/js)"
  (cd "$HERE/js" && npm ci --no-audit --no-fund --loglevel=error)
fi

if [ "${KILN_E2E_SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build"
  (cd "$ROOT" && cargo build --bins)
fi
[ -x "$KILN_BIN" ] || die "kiln binary not found at $KILN_BIN (cargo build, or set KILN_BIN)"

# --- a NATS server of the run's own ---------------------------------------------------
# The server publishes lifecycle events to it and takes spell and desktop requests from
# it (test_nats.py). Fails, never skips, without nats-server (install-deps installs it).
mkdir -p "$LOG_DIR" "$DATA_DIR"
NATS_BIN="$(command -v nats-server || true)"
[ -n "$NATS_BIN" ] || die "nats-server not found: install Debian's nats-server package (scripts/install-deps.sh)"
NATS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" >"$LOG_DIR/nats-$$.log" 2>&1 &
NATS_PID=$!
export KILN_NATS_URL="nats://127.0.0.1:$NATS_PORT"

# --- a CA of the run's own for the test's HTTPS servers -----------------------------------
# The egress proxy verifies the real servers behind a sandbox's `network.rules` like any
# TLS client; the run's servers (test_network.py) have certificates from this CA, which
# the server is told to trust besides the usual roots.
EGRESS_CA_DIR="$LOG_DIR/egress-ca-$$"
mkdir -p "$EGRESS_CA_DIR"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=Kiln e2e upstream CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$EGRESS_CA_DIR/ca.key" -out "$EGRESS_CA_DIR/ca.pem" 2>/dev/null \
  || die "openssl could not make the run's test CA"
export KILN_EGRESS_UPSTREAM_CA="$EGRESS_CA_DIR/ca.pem"
export KILN_E2E_EGRESS_CA_KEY="$EGRESS_CA_DIR/ca.key"

# --- start the server ------------------------------------------------------------------
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADDR="127.0.0.1:$PORT"
KILN_API_KEY="e2b_$(python3 -c 'import secrets; print(secrets.token_hex(20))')"
export KILN_API_KEY
# A small disk cap per sandbox, so test_boundary.py can write past it in seconds.
export KILN_SANDBOX_DISK_MB="${KILN_SANDBOX_DISK_MB:-1024}"
RUNTIME_ARGS=()
[ -n "${KILN_E2E_RUNTIME:-}" ] && RUNTIME_ARGS=(--runtime "$KILN_E2E_RUNTIME")
# Sandbox hosts over TLS (test_tls_hosts.py) on 127.0.0.1:443: the SDK's envd client
# resolves `*.localhost` to 127.0.0.1 itself, and `https://{port}-{id}.localhost` has
# no port. Two runs at once on one host collide here (the second server fails to start,
# saying so). The certificate is the local CA's.
TLS_ADDR="${KILN_E2E_TLS_ADDR:-127.0.0.1}"
RUNTIME_ARGS+=(--sandbox-tls-listen "$TLS_ADDR:443")
export KILN_E2E_TLS_ADDR="$TLS_ADDR"

# The operator's token for public desktops' live views (E2B_DESKTOP_AUTH_TOKEN): a
# browser opening a desktop's stream URL must bring it as `?kiln_token=` (test_desktop.py,
# test_nats.py, test_surf.py check both ways).
E2B_DESKTOP_AUTH_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
export E2B_DESKTOP_AUTH_TOKEN

# Start Kiln in the background the way the README's first command does
# (scripts/serve: install-deps, a release build of every binary it runs, then `exec kiln
# serve`), so a missing build step fails here; then wait until /healthz answers 200.
# KILN_E2E_SERVER_BIN=path runs that kiln binary directly instead (a quick local loop).
start_server() {
  log "scripts/serve --listen $ADDR --data-dir $DATA_DIR ${RUNTIME_ARGS[*]:-} (log: $SERVER_LOG)"
  if [ -n "${KILN_E2E_SERVER_BIN:-}" ]; then
    RUST_LOG="${RUST_LOG:-info}" "$KILN_E2E_SERVER_BIN" serve --listen "$ADDR" --data-dir "$DATA_DIR" \
      "${RUNTIME_ARGS[@]}" >>"$SERVER_LOG" 2>&1 &
  else
    RUST_LOG="${RUST_LOG:-info}" "$ROOT/scripts/serve" --listen "$ADDR" --data-dir "$DATA_DIR" \
      "${RUNTIME_ARGS[@]}" >>"$SERVER_LOG" 2>&1 &
  fi
  SERVER_PID=$!

  started=$SECONDS
  next_report=$((SECONDS + 10))
  shown=0
  show_new_log() {
    local total
    total=$(wc -l <"$SERVER_LOG")
    if [ "$total" -gt "$shown" ]; then
      tail -n "+$((shown + 1))" "$SERVER_LOG" | tail -n 20 | sed 's/^/  [serve] /' >&2
      shown=$total
    fi
  }
  until curl -fsS -o /dev/null -m 2 "http://$ADDR/healthz" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" && status=0 || status=$?
      SERVER_PID=""
      echo "--- last 60 lines of $SERVER_LOG" >&2
      tail -n 60 "$SERVER_LOG" >&2
      die "kiln serve exited with status $status before /healthz answered"
    fi
    if [ $((SECONDS - started)) -ge "$HEALTH_TIMEOUT" ]; then
      show_new_log
      die "/healthz did not answer 200 within $HEALTH_TIMEOUT s"
    fi
    if [ "$SECONDS" -ge "$next_report" ]; then
      echo "waiting for /healthz ($((SECONDS - started)) s)..." >&2
      show_new_log
      next_report=$((SECONDS + 10))
    fi
    sleep 1
  done
  echo "kiln serve ready after $((SECONDS - started)) s" >&2
}
start_server

# The built-in templates (code-interpreter-v1) are built after /healthz answers; the
# suites need them, so wait until /healthz lists nothing as building.
wait_for_builtins() {
  local started=$SECONDS building
  while :; do
    building="$(curl -fsS -m 5 "http://$ADDR/healthz" 2>/dev/null \
      | python3 -c 'import json, sys; print(",".join(json.load(sys.stdin).get("building", [])))' 2>/dev/null || echo '?')"
    [ -z "$building" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "kiln serve exited while building $building"
    if [ $((SECONDS - started)) -ge "$BUILTIN_TIMEOUT" ]; then
      tail -n 40 "$SERVER_LOG" >&2
      die "built-in templates ($building) not built within $BUILTIN_TIMEOUT s"
    fi
    if [ $(((SECONDS - started) % 20)) -lt 2 ]; then
      echo "waiting for the built-in templates: $building ($((SECONDS - started)) s)" >&2
      tail -n 1 "$SERVER_LOG" | cut -c1-200 | sed 's/^/  [serve] /' >&2
    fi
    sleep 2
  done
  echo "built-in templates ready after $((SECONDS - started)) s" >&2
}
wait_for_builtins
if [ -n "${KILN_E2E_EXPECT_RUNTIME:-}" ]; then
  banner="$(grep -m1 'Kiln is ready on' "$SERVER_LOG" || true)"
  case "$banner" in
    *"(runtime: $KILN_E2E_EXPECT_RUNTIME"*) echo "runtime as expected: ${banner#*runtime: }" >&2 ;;
    *) die "expected runtime $KILN_E2E_EXPECT_RUNTIME; the banner says: ${banner:-nothing}" ;;
  esac
fi
for var in E2B_API_URL E2B_SANDBOX_URL E2B_API_KEY; do
  grep -q "export $var=" "$SERVER_LOG" || echo "warning: the start banner has no 'export $var=' line" >&2
done

export E2B_API_URL="http://$ADDR"
export E2B_SANDBOX_URL="http://$ADDR"
export E2B_API_KEY="$KILN_API_KEY"
export KILN_E2E_DATA_DIR="$DATA_DIR"

# --- run the suites --------------------------------------------------------------------
failed=()

# What the README promises right after the start completes: the code interpreter
# answers run_code("1+1") with 2 (skipped when the built-ins are turned off).
if [ "${KILN_BUILTIN_TEMPLATES:-}" != none ]; then
  log "README check: e2b-code-interpreter run_code(\"1+1\")"
  if ! (cd "$HERE" && timeout 300 .venv/bin/python - <<'PYEOF'
from e2b_code_interpreter import Sandbox
sbx = Sandbox.create(timeout=120)
try:
    out = sbx.run_code("1+1")
    assert out.text == "2", f"run_code('1+1') gave {out.text!r} (error: {out.error})"
    print("run_code('1+1') ->", out.text)
finally:
    sbx.kill()
PYEOF
  ); then
    failed+=("README check: run_code")
  fi
fi
log "pytest (Python SDK e2b==2.45.1)"
(cd "$HERE" && .venv/bin/pytest -v "$@") || failed+=("pytest")

if [ "${KILN_E2E_SKIP_JS:-0}" != 1 ]; then
  log "node --test (JS SDK)"
  (cd "$HERE/js" && node --test) || failed+=("js")
fi

# --- restart: sandboxes survive a server restart and their deadlines still hold --------
log "restart (re-adoption and persisted deadlines)"
RESTART_STATE="${SERVER_LOG%.log}.restart-state.json"
if (cd "$HERE" && .venv/bin/python restart_check.py before >"$RESTART_STATE"); then
  stop_server
  start_server
  (cd "$HERE" && .venv/bin/python restart_check.py after <"$RESTART_STATE") || failed+=("restart")
else
  failed+=("restart")
fi

# --- leaks -----------------------------------------------------------------------------
log "leak checks"
left="$(curl -fsS -m 10 -H "X-API-KEY: $E2B_API_KEY" "http://$ADDR/v2/sandboxes" || echo '?')"
if [ "$(printf '%s' "$left" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))' 2>/dev/null)" != 0 ]; then
  echo "sandboxes still listed after the suites: $left" >&2
  failed+=("sandboxes left running")
fi

stop_server
[ "$SERVER_STOP_FAILED" = 0 ] || failed+=("server did not stop on SIGTERM")

# Every line the audit log got during the run is JSON with the seed's fields
# (docs/operating.md, "Audit log"), and no API key is in it.
AUDIT="$DATA_DIR/audit/audit.log"
if ! python3 - "$AUDIT" "$E2B_API_KEY" <<'PYEOF'
import json, sys
path, key = sys.argv[1], sys.argv[2]
fields = ["timestamp", "event_type", "sandbox_id", "user_id", "agent_id", "language",
          "duration_ms", "success", "ip_address"]
types = {"sandbox.created", "sandbox.executed", "sandbox.terminated", "sandbox.failed",
         "template.built", "key.created", "key.revoked", "auth.failed",
         "network.denied", "secret.created", "secret.updated", "secret.deleted"}
seen = set()
with open(path) as f:
    for n, line in enumerate(f, 1):
        if key in line:
            sys.exit(f"{path}:{n}: an API key in the audit log")
        rec = json.loads(line)
        missing = [k for k in fields if k not in rec]
        if missing or rec["event_type"] not in types:
            sys.exit(f"{path}:{n}: missing {missing} or unknown type: {line.strip()}")
        seen.add(rec["event_type"])
want = {"sandbox.created", "sandbox.terminated"}
if not want <= seen:
    sys.exit(f"{path}: no {sorted(want - seen)} events in the run")
print(f"audit log: {n} lines, all parse; types seen: {', '.join(sorted(seen))}")
PYEOF
then
  failed+=("audit log")
fi

# Processes whose root or cwd is inside the data dir belong to a sandbox of this server.
DATA_REAL="$(realpath "$DATA_DIR")"
leaked_procs=""
for p in /proc/[0-9]*; do
  for link in root cwd; do
    target="$(readlink "$p/$link" 2>/dev/null || true)"
    case "$target" in
      "$DATA_REAL"/*)
        leaked_procs+="  pid ${p#/proc/} ($link=$target): $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-120)"$'\n'
        break
        ;;
    esac
  done
done
if [ -n "$leaked_procs" ]; then
  printf 'processes left inside %s:\n%s' "$DATA_REAL" "$leaked_procs" >&2
  failed+=("sandbox processes left")
fi

leaked_mounts="$(awk -v d="$DATA_REAL/" 'index($5, d) == 1 { print "  " $5 " (" $9 ")" }' /proc/self/mountinfo)"
if [ -n "$leaked_mounts" ]; then
  printf 'mounts left under %s:\n%s\n' "$DATA_REAL" "$leaked_mounts" >&2
  failed+=("mounts left")
fi

# The jail's and gVisor's state dirs; gVisor keeps runsc's own files (runsc-root/,
# runsc-probe-*) beside the sandboxes.
for dir in "$DATA_REAL/sandboxes" "$DATA_REAL/sandboxes-gvisor"; do
  [ -d "$dir" ] || continue
  left_dirs="$(ls -A "$dir" | grep -v -E '^(runsc-root|runsc-probe-.*)$' || true)"
  if [ -n "$left_dirs" ]; then
    echo "sandbox directories left in $dir: $left_dirs" >&2
    failed+=("sandbox directories left")
  fi
done

# Informational: what else the data dir holds (layout is the server's business).
echo "data dir after the run: $(ls -A "$DATA_REAL" | tr '\n' ' ')" >&2

if [ "${#failed[@]}" -gt 0 ]; then
  echo "server log: $SERVER_LOG" >&2
  die "${failed[*]}"
fi
log "e2e passed (server log: $SERVER_LOG)"
