#!/usr/bin/env bash
# Peak memory of `kiln serve` while a template build prints 1 GiB without a newline
# (the step runner cuts it into 16 KiB log lines; the server keeps a bounded tail in
# memory and the rest in templates/.builds/<buildID>.log, capped at 64 MiB).
#
# Needs a running server: KILN_URL (e.g. http://127.0.0.1:3999), E2B_API_KEY, and the
# server's pid in KILN_PID. Builds a throwaway template from `base` (forced, so the layer
# cache never answers), samples VmRSS from /proc/$KILN_PID/status every second until the
# build ends, prints the idle, peak and after figures, and deletes the template.
set -euo pipefail
: "${KILN_URL:?set KILN_URL to the URL of kiln serve}"
: "${E2B_API_KEY:?set E2B_API_KEY}"
: "${KILN_PID:?set KILN_PID to the pid of kiln serve}"
[ -r "/proc/$KILN_PID/status" ] || { echo "no process $KILN_PID" >&2; exit 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$KILN_PID/status"; }
api() {
  local method=$1 path=$2
  shift 2
  curl -sS --fail-with-body -X "$method" -H "X-API-KEY: $E2B_API_KEY" \
    -H 'Content-Type: application/json' "$@" "$KILN_URL$path"
}
field() { sed -n 's/.*"'"$1"'":"\([^"]*\)".*/\1/p'; }

name="bench-log-$$"
idle=$(rss_kib)
created=$(api POST /v3/templates -d "{\"name\":\"$name\",\"cpuCount\":1,\"memoryMB\":512}")
tid=$(echo "$created" | field templateID)
bid=$(echo "$created" | field buildID)
# 1 GiB of 'a' and no newline. JSON: the backslash of tr's '\0' is escaped.
spec='{"fromTemplate":"base","force":true,"steps":[{"type":"RUN","args":["head -c 1073741824 /dev/zero | tr '"'\\\\0'"' a"]}]}'
api POST "/v2/templates/$tid/builds/$bid" -d "$spec" >/dev/null
started=$(date +%s)
peak=$idle
status=building
while [ "$status" != ready ] && [ "$status" != error ]; do
  sleep 1
  now=$(rss_kib)
  [ "$now" -gt "$peak" ] && peak=$now
  status=$(api GET "/templates/$tid/builds/$bid/status?limit=0" | field status)
done
secs=$(( $(date +%s) - started ))
after=$(rss_kib)
echo "build $bid: $status after ${secs} s"
api GET "/templates/$tid/builds/$bid/status?limit=0" | sed -n 's/.*"reason":\(.*\)}/reason: \1/p'
printf 'VmRSS of kiln serve: idle %d MiB, peak during the build %d MiB, after %d MiB\n' \
  $((idle / 1024)) $((peak / 1024)) $((after / 1024))
echo "build log: <data-dir>/templates/.builds/$bid.log"
api DELETE "/templates/$tid" >/dev/null 2>&1 || true
