#!/usr/bin/env bash
# The ext4 image benchmark of docs/BENCHMARKS.md ("Template disk images"): time of
# `kiln template image` (mkfs.ext4 -d in a user namespace mapping the sandbox ids) beside
# its floor, a plain `mkfs.ext4 -d` of the same tree as host root (which keeps the host
# ids, so it is not a usable image, only the cost of the copy), each RUNS times.
#
# Usage (root): bench/template-image.sh [DATA_DIR] [TEMPLATE]
#               (default /var/lib/kiln-e2e base; release build of kiln)
# Environment: KILN_BENCH_RUNS (3), KILN_BENCH_SKIP_BUILD=1, KILN_BENCH_OUT (a directory on
#              the data dir's filesystem, default DATA_DIR/.bench-images)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA_DIR="${1:-/var/lib/kiln-e2e}"
TEMPLATE="${2:-base}"
RUNS="${KILN_BENCH_RUNS:-3}"
OUT="${KILN_BENCH_OUT:-$DATA_DIR/.bench-images}"
KILN="$ROOT/target/x86_64-unknown-linux-gnu/release/kiln"
ROOTFS="$DATA_DIR/templates/$TEMPLATE/rootfs"
SIZE_MB="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disk_size_mb"])' \
  "$DATA_DIR/templates/$TEMPLATE/template.json")"

[ "${KILN_BENCH_SKIP_BUILD:-}" = 1 ] || (cd "$ROOT" && cargo build --release -q -p kiln)
mkdir -p "$OUT"
trap 'rm -rf "$OUT"' EXIT

seconds() { # command...
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}

echo "template $TEMPLATE: $(du -sh --apparent-size "$ROOTFS" | cut -f1) in $(find "$ROOTFS" | wc -l) entries, disk $SIZE_MB MiB"
for run in $(seq "$RUNS"); do
  sync; echo 3 >/proc/sys/vm/drop_caches
  image=$(seconds "$KILN" template image "$TEMPLATE" --data-dir "$DATA_DIR" -o "$OUT/kiln.ext4")
  sync; echo 3 >/proc/sys/vm/drop_caches
  floor=$(seconds mkfs.ext4 -q -F -t ext4 -d "$ROOTFS" "$OUT/floor.ext4" "${SIZE_MB}M")
  used=$(du -m "$OUT/kiln.ext4" | cut -f1)
  echo "run $run: kiln template image ${image} s (image takes ${used} MiB on the host); floor mkfs.ext4 -d ${floor} s"
  rm -f "$OUT"/*.ext4
done
