# Training on NVIDIA GPUs: the entry point is torchrun, every argument is passed through to it.
# Build from the repository root, run with the NVIDIA container toolkit:
#
#   docker build -f docker/train.Dockerfile -t duet-train .
#   docker run --rm --gpus all --ipc=host -v "$PWD/data:/workspace/data:ro" \
#       -v "$PWD/runs:/workspace/runs" duet-train \
#       --standalone --nproc_per_node=gpu -m train --recipe default --set run_dir=runs/x --set ...
#
# Several nodes: the same `docker run` on each, with --network=host and torchrun's
# --nnodes/--node_rank/--rdzv_* arguments (docs/operations.md).
# Build arguments: CUDA_IMAGE (any Debian/Ubuntu image works; the CUDA base only adds the
# settings the NVIDIA container toolkit reads, because the torch wheels bring their own CUDA
# libraries), PIP_INDEX_URL, TORCH_INDEX_URL and docker/ca-bundle.crt as in serve.Dockerfile.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS python
# The CUDA base has no Python: the distribution's python3 (3.12 on Ubuntu 24.04). Nothing comes
# from NVIDIA's apt repository (the torch wheels carry CUDA), so its source is dropped: one less
# HTTPS mirror to reach. hadolint DL3008: versions differ by base image, so they are not pinned.
# hadolint ignore=DL3008
RUN rm -f /etc/apt/sources.list.d/cuda*.list /etc/apt/sources.list.d/nvidia*.list \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first (the torch layer is cached while pyproject.toml stays the same); the glob
# makes the CA bundle optional.
COPY pyproject.toml docker/ca-bundle.cr[t] docker/install-venv.sh /tmp/build/
RUN sh /tmp/build/install-venv.sh deps
COPY pyproject.toml README.md ./
COPY common common
COPY train train
COPY serve serve
RUN sh /tmp/build/install-venv.sh package

FROM python
# compute.compile: Triton builds its kernel launchers with a C compiler against Python's headers,
# and inductor's CPU kernels need g++. hadolint DL3008: as above.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc g++ libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash duet \
    && mkdir -p /workspace \
    && chown duet:duet /workspace
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Relative paths in recipes (data/..., runs/...) resolve here: mount data and runs below it.
WORKDIR /workspace
ENTRYPOINT ["torchrun"]
CMD ["-m", "train", "--help"]
