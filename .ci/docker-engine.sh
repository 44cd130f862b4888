#!/usr/bin/env bash
# Starts a Docker engine and builds the offline Python base image the docker tests build on.
# Idempotent: an engine that answers and an image that exists are left as they are, so later runs
# skip the work. Needs root and Debian's packages when the engine is not installed yet.
set -euo pipefail
BASE_IMAGE=${DCM_FLOWS_BASE_IMAGE:-dcm-flows/python-base:bookworm}
ROOTFS=${DCM_FLOWS_ROOTFS:-/var/tmp/dcm-flows-rootfs}
export DEBIAN_FRONTEND=noninteractive

engine_answers() { docker info >/dev/null 2>&1; }

# The Debian mirror this machine's apt uses (deb822 `URIs:` or a one-line `deb` entry), so debootstrap
# fetches from the same configured source as apt-get does.
apt_mirror() {
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
  } | grep -v -- '-security' | grep -m1 '/debian/\?$'
}

if ! engine_answers; then
  if ! command -v dockerd >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
  fi
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 120); do engine_answers && break; sleep 0.5; done
  engine_answers || { echo "dockerd did not start; see /var/log/dockerd.log" >&2; exit 1; }
fi
echo "docker engine $(docker info --format '{{.ServerVersion}}') is running"

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
  fi
  rm -rf "$ROOTFS"
  # libmagic1: python-magic (used by dcm_processor_db_provider) loads it at import time.
  debootstrap --variant=minbase --include=python3,python3-venv,libmagic1 bookworm "$ROOTFS" \
    "$(apt_mirror)" >/var/log/dcm-flows-debootstrap.log 2>&1
  rm -f "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin
  find "$ROOTFS"/var/lib/apt/lists -maxdepth 1 -type f ! -name lock -delete
  tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$ROOTFS"
fi
docker run --rm "$BASE_IMAGE" python3 -c 'import sys; print("base image python", sys.version.split()[0])'
