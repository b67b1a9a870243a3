#!/usr/bin/env bash
# Build a Python base image from Debian packages, for machines that cannot pull from a registry.
#
#   sudo docker/local-base.sh [IMAGE]        # default IMAGE: duet-local/python:3.11-bookworm
#   docker build --build-arg PYTHON_IMAGE=duet-local/python:3.11-bookworm \
#       -f docker/serve.Dockerfile -t duet-serve .
#
# debootstrap writes a minimal Debian bookworm root (python3 3.11, python3-venv, python3-pip,
# ca-certificates) that `docker import` turns into an image. It stands in for
# python:3.11-slim-bookworm and for the CUDA base of the train image in a CPU-only check: the
# Dockerfiles use only `python3 -m venv`, which both provide. Needs root, debootstrap and a
# Debian mirror (DEBIAN_MIRROR, default http://deb.debian.org/debian). Does nothing if IMAGE
# exists already, unless FORCE=1.
set -euo pipefail

IMAGE=${1:-duet-local/python:3.11-bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE exists (FORCE=1 rebuilds it)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "error: apt-get install debootstrap" >&2; exit 1; }

root=$(mktemp -d /var/tmp/duet-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR"

# What a slim image leaves out: package caches and lists, documentation, manuals, locales.
# The sources list is kept so that `apt-get update && apt-get install` works in derived images.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} +
find "$root"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} +
printf '%s\n' "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
  "deb http://deb.debian.org/debian-security $SUITE-security main" >"$root"/etc/apt/sources.list

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES (docker/local-base.sh)" \
  - "$IMAGE"
echo "built $IMAGE in $(($(date +%s) - start)) s:"
docker image ls "$IMAGE"
