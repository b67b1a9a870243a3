#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`; start one if none does and we may.
#
#   docker/dockerd.sh          (as root for the start; log in $DOCKERD_LOG)
#
# With systemd: `systemctl start docker`. Without it (containers, VMs without an init system):
# Debian's dockerd (apt-get install docker.io) in the background on its default socket,
# /var/run/docker.sock. An engine elsewhere is used as it is: set DOCKER_HOST.
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/duet-dockerd.log}

if docker info >/dev/null 2>&1; then
  exit 0
fi
if [ -n "${DOCKER_HOST:-}" ]; then
  echo "error: no Docker engine answers at DOCKER_HOST=$DOCKER_HOST" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null; then
  echo "error: no Docker engine answers; as root: apt-get install docker.io, then" \
    "systemctl start docker (or: dockerd &)" >&2
  exit 1
fi
if [ -d /run/systemd/system ]; then
  systemctl start docker
else
  echo "starting dockerd in the background (log: $LOG)"
  setsid dockerd >"$LOG" 2>&1 </dev/null &
fi
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "error: dockerd did not answer within 60 s; see $LOG" >&2
exit 1
