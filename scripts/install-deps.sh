#!/usr/bin/env bash
# Install what Kiln needs on a fresh Debian/Ubuntu host, idempotently:
#   mmdebstrap      builds the Debian root filesystem of the `base` template
#   iptables        NAT and isolation rules for sandboxes with internet access
#   iproute2        veth pairs and addresses
#   uidmap          subordinate id tools (uid-shifted template trees)
#   busybox-static  the tiny root filesystem of the jail runtime's own tests (and of the
#                   image the registry-pull tests push)
#   docker-registry a local OCI registry (distribution v2) the registry-pull tests start
#   e2fsprogs       ext4 images for templates
#   runsc           gVisor, for the gvisor runtime
#   prometheus      promtool, which checks and unit-tests deploy/prometheus (scripts/test),
#                   and the server tests/e2e/test_metrics.py starts on a free port (the
#                   package's own service, if the host starts it, listens on :9090 and
#                   does not get in the way)
#   nats-server     the NATS server kiln-server's event tests start on a free port
#   chromium        the headless browser tests/e2e/test_desktop.py opens a desktop's live
#                   view in (through Playwright, which downloads no browser of its own)
set -euo pipefail

packages=(mmdebstrap iptables iproute2 uidmap busybox-static e2fsprogs ca-certificates runsc docker-registry prometheus nats-server chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# gVisor: bookworm's runsc (0.0~20221219) fails statx with EINVAL (`ls -l`, `stat`) and
# has no systrap platform. The gvisor runtime uses trixie's build instead (a static
# binary, no Depends), installed as /usr/local/bin/runsc, which comes before /usr/bin
# on PATH; bookworm's runsc package stays installed. Fetched with apt from Debian's
# archive (the host's configured mirror) through a temporary sources list (signatures checked against
# debian-archive-keyring), so nothing else on the host changes.
# The Debian archive this host already uses (its mirror; apt's own proxy settings apply
# as for any apt-get here): the first URI serving a Debian suite's main component in
# the host's sources, deb822 (*.sources) or one-line (*.list). KILN_DEBIAN_MIRROR
# overrides it; with none found, Debian's own deb.debian.org.
debian_mirror() {
  if [ -n "${KILN_DEBIAN_MIRROR:-}" ]; then
    echo "$KILN_DEBIAN_MIRROR"
    return
  fi
  local found
  found="$(
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -r "$f" ] || continue
      # One stanza per paragraph; take URIs of stanzas whose Suites name a Debian
      # release (not -security) and whose Components include main.
      awk 'BEGIN { RS = ""; FS = "\n" }
        {
          uris = ""; suites = ""; comps = ""
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) uris = substr($i, 6)
            if ($i ~ /^Suites:/) suites = substr($i, 8)
            if ($i ~ /^Components:/) comps = substr($i, 12)
          }
          if (suites ~ /(bookworm|trixie|bullseye|sid)( |$)/ && comps ~ /(^| )main( |$)/) {
            split(uris, u, " "); for (k in u) if (u[k] != "") { print u[k]; exit }
          }
        }' "$f"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1 == "deb" {
        n = 2; if ($2 ~ /^\[/) { while (n <= NF && $n !~ /\]$/) n++; n++ }
        if ($(n+1) ~ /^(bookworm|trixie|bullseye|sid)$/) { print $n; exit }
      }'
  )"
  found="$(echo "$found" | sed -n 's#/*$##; 1p')"
  echo "${found:-http://deb.debian.org/debian}"
}

RUNSC_DEB_VERSION="0.0~20240729.0-4+b7"
RUNSC_VERSION_LINE="runsc version ${RUNSC_DEB_VERSION%%-*}"
RUNSC_DEST=/usr/local/bin/runsc
if [ "$("$RUNSC_DEST" --version 2>/dev/null | sed -n 1p)" != "$RUNSC_VERSION_LINE" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install $RUNSC_DEST ($RUNSC_VERSION_LINE)" >&2
    exit 1
  fi
  if [ "$(dpkg --print-architecture)" != amd64 ]; then
    echo "install-deps: the pinned runsc $RUNSC_DEB_VERSION is the amd64 build; install a runsc >= 2024 as $RUNSC_DEST by hand" >&2
    exit 1
  fi
  echo "install-deps: installing runsc $RUNSC_DEB_VERSION (Debian trixie) as $RUNSC_DEST"
  runsc_tmp="$(mktemp -d)"
  trap 'rm -rf "$runsc_tmp"' EXIT
  mkdir -p "$runsc_tmp/lists/partial" "$runsc_tmp/cache/archives/partial" "$runsc_tmp/deb"
  mirror="$(debian_mirror)"
  echo "install-deps: fetching it from $mirror (the host's Debian archive)"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
    >"$runsc_tmp/sources.list"
  # apt downloads as the unprivileged _apt user where it exists.
  chmod 0755 "$runsc_tmp"
  if id _apt >/dev/null 2>&1; then chown -R _apt "$runsc_tmp/lists" "$runsc_tmp/deb"; fi
  apt_trixie=(
    -o "Dir::Etc::sourcelist=$runsc_tmp/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$runsc_tmp/lists" -o "Dir::Cache=$runsc_tmp/cache"
    -o Acquire::Languages=none -o APT::Architectures=amd64
  )
  apt-get "${apt_trixie[@]}" update -qq
  (cd "$runsc_tmp/deb" && apt-get "${apt_trixie[@]}" download -qq "runsc=$RUNSC_DEB_VERSION")
  deb="$(echo "$runsc_tmp"/deb/runsc_*.deb)"
  got="$(dpkg-deb -f "$deb" Package Version | tr '\n' ' ')"
  if [ "$got" != "Package: runsc Version: $RUNSC_DEB_VERSION " ]; then
    echo "install-deps: downloaded $deb is not runsc $RUNSC_DEB_VERSION ($got)" >&2
    exit 1
  fi
  dpkg-deb -x "$deb" "$runsc_tmp/x"
  got="$("$runsc_tmp/x/usr/bin/runsc" --version | sed -n 1p)"
  if [ "$got" != "$RUNSC_VERSION_LINE" ]; then
    echo "install-deps: the downloaded runsc says \"$got\", expected \"$RUNSC_VERSION_LINE\"" >&2
    exit 1
  fi
  install -m 0755 "$runsc_tmp/x/usr/bin/runsc" "$RUNSC_DEST.new"
  mv -f "$RUNSC_DEST.new" "$RUNSC_DEST"
  rm -rf "$runsc_tmp"
  trap - EXIT
fi
