# The retrieval service on CPU: uvicorn runs serve.app:create_app; the model artifact and the
# index come from a mounted volume. Build from the repository root:
#
#   docker build -f docker/serve.Dockerfile -t duet-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 \
#       -v "$PWD/runs/demo/artifact:/data/artifact:ro" -v "$PWD/runs/demo/index:/data/index:ro" \
#       duet-serve
#
# Build arguments and options (docs/operations.md):
#   PYTHON_IMAGE     base with python3 >= 3.11 and its venv module (docker/local-base.sh makes one
#                    with debootstrap where no registry can be reached)
#   PIP_INDEX_URL    where packages come from (default PyPI)
#   TORCH_INDEX_URL  empty: torch from PIP_INDEX_URL (PyPI's torch is the CUDA build, ~5 GB with
#                    its nvidia-* wheels, and runs on CPU); https://download.pytorch.org/whl/cpu
#                    gives CPU-only torch + torchvision and a much smaller image
#   docker/ca-bundle.crt  (git-ignored) a CA bundle pip uses, for proxies that intercept TLS; it
#                    stays in the builder stage
# Runtime settings: DUET_* (serve/settings.py) and UVICORN_* (uvicorn's options, e.g.
# UVICORN_WORKERS; each worker loads its own copy of the model).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=
WORKDIR /src
# Dependencies first, in a layer of their own: changing the code does not download torch again.
# The glob makes the CA bundle optional (a COPY needs one matching source; pyproject.toml is it).
COPY pyproject.toml docker/ca-bundle.cr[t] docker/install-venv.sh /tmp/build/
RUN sh /tmp/build/install-venv.sh deps
COPY pyproject.toml README.md ./
COPY common common
COPY train train
COPY serve serve
RUN sh /tmp/build/install-venv.sh package

FROM ${PYTHON_IMAGE}
# /data/indexes: where a volume for indexes built in a container goes (docker/compose.yaml); a
# new named volume takes this directory's owner, so the service user can write into it.
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin duet \
    && mkdir -p /data/indexes \
    && chown duet:duet /data/indexes
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/duet-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DUET_ARTIFACT_DIR=/data/artifact \
    DUET_INDEX_DIR=/data/index \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000 \
    UVICORN_WORKERS=1 \
    UVICORN_LIMIT_CONCURRENCY=64 \
    UVICORN_BACKLOG=256 \
    UVICORN_TIMEOUT_KEEP_ALIVE=5 \
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=5 \
    UVICORN_LOG_LEVEL=info \
    UVICORN_HTTP=serve.http:GuardedHttpToolsProtocol
USER 10001:10001
WORKDIR /home/duet
EXPOSE 8000
# Healthy = /ready answers 200 = model and indices loaded. Loading takes seconds for small models;
# give large ones more start period with `docker run --health-start-period`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/duet-healthcheck"]
CMD ["uvicorn", "--factory", "serve.app:create_app"]
