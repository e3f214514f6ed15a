#!/usr/bin/env bash
# Install what Kiln needs on a fresh Debian/Ubuntu host, idempotently:
#   mmdebstrap      builds the Debian root filesystem of the `base` template
#   iptables        NAT and isolation rules for sandboxes with internet access
#   iproute2        veth pairs and addresses
#   uidmap          subordinate id tools (uid-shifted template trees)
#   busybox-static  the tiny root filesystem of the jail runtime's own tests
#   e2fsprogs       ext4 images for templates
#   runsc           gVisor, for the gvisor runtime
set -euo pipefail

packages=(mmdebstrap iptables iproute2 uidmap busybox-static e2fsprogs ca-certificates runsc)
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
