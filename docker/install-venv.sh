#!/bin/sh
# Image build step shared by serve.Dockerfile and train.Dockerfile: Duet in the virtualenv /opt/venv.
#
#   install-venv.sh deps     the venv and every dependency in /tmp/build/pyproject.toml (build
#                            requirements included): the big layer, cached while pyproject.toml
#                            stays the same
#   install-venv.sh package  Duet itself from the source in the working directory, no dependencies,
#                            no network
#
# TLS: /tmp/build/ca-bundle.crt, copied from docker/ca-bundle.crt when the build context has one,
# replaces pip's CA bundle (for a proxy that intercepts TLS). PIP_INDEX_URL / PIP_EXTRA_INDEX_URL
# are pip's own settings. TORCH_INDEX_URL, when set, is the index torch and torchvision come from
# first (https://download.pytorch.org/whl/cpu: CPU-only wheels); otherwise they come from
# PIP_INDEX_URL like everything else (PyPI: the CUDA build, which also runs on CPU).
set -eu

VENV=/opt/venv
BUILD=/tmp/build
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ -f "$BUILD/ca-bundle.crt" ]; then
  export PIP_CERT="$BUILD/ca-bundle.crt"
fi

case "${1:-}" in
  deps)
    python3 -m venv "$VENV"
    "$VENV/bin/python" - "$BUILD/pyproject.toml" >"$BUILD/requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))
PY
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "$VENV/bin/pip" install --index-url "$TORCH_INDEX_URL" torch torchvision
    fi
    "$VENV/bin/pip" install --requirement "$BUILD/requirements.txt"
    ;;
  package)
    # The build backend (setuptools) is in the venv already: no isolated build env to download.
    "$VENV/bin/pip" install --no-deps --no-build-isolation .
    "$VENV/bin/pip" check
    ;;
  *)
    echo "usage: $0 deps|package" >&2
    exit 2
    ;;
esac
