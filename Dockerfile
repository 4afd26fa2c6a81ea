# gemma-export deployment image: `gemma-export serve` on ONNX Runtime, no torch.
#
#   docker build --target runtime -t gemma-export .                  # the server, no model
#   docker run --rm -p 8000:8000 -v "$PWD/g270-int8:/model:ro" --read-only --tmpfs /tmp gemma-export
#   docker build --target with-model --build-arg ARTIFACT=artifacts/image/model -t gemma-export:270m .
#
# The last stage is with-model, so a build without --target bakes artifacts/image/model
# (where `make image` puts the artifact); ARTIFACT must lie under artifacts/image/ (.dockerignore).
#
# Build arguments:
#   BASE         any Debian/Ubuntu image; python3 and python3-venv are installed when it has
#                no python3 (CI imports a debootstrap bookworm with them, scripts/docker_base.sh)
#   ORT          onnxruntime (CPU) or onnxruntime-gpu (CUDA variant, with a CUDA runtime BASE)
#   PIP_OFFLINE  1: install only from the wheels in docker/wheels (no index reached)
#   VERSION, SOURCE  OCI labels; ARTIFACT  the artifact directory baked by `with-model`
# See README "Deploy".

ARG BASE=python:3.11-slim-bookworm

# Step order matters with the vfs storage driver (CI's fallback where overlay2 cannot run):
# each step, metadata ones included, copies the whole filesystem, so the few steps on the
# large filesystem come last.

# --- builder: a virtual environment with gemma-export[serve]; pip and wheels stay here ---
FROM ${BASE} AS builder
ARG ORT=onnxruntime
ARG PIP_OFFLINE=0
COPY docker/wheels /wheels
COPY pyproject.toml README.md constraints.txt /src/
COPY gemma_export /src/gemma_export
# python3 and python3-venv when the base lacks them (a CUDA runtime base). Then the runtime
# and the server only: gemma-export's base dependencies carry no torch and need no compiler,
# at the versions CI tests (constraints.txt).
# onnxruntime and onnxruntime-gpu provide the same module, so never both.
# hadolint ignore=DL3008,DL3013
RUN set -eu; \
    if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip" 2>/dev/null; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv && \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv; \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/venv/bin/pip install --no-cache-dir -c /src/constraints.txt "$@" "/src[serve]"; \
    if [ "$ORT" != onnxruntime ]; then \
        /opt/venv/bin/pip uninstall -y onnxruntime; \
        /opt/venv/bin/pip install --no-cache-dir "$@" "$ORT"; \
    fi; \
    /opt/venv/bin/pip uninstall -y pip setuptools

# --- runtime: the venv on the same base, a fixed non-root uid, writes only /tmp ---
FROM ${BASE} AS runtime
ARG VERSION=0.1.0
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="gemma-export" \
      org.opencontainers.image.description="Gemma on ONNX Runtime: gemma-export serve, OpenAI-compatible" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The interpreter the venv links to (a CUDA base has none), and the user: uid/gid 10001,
# written to /etc/passwd directly because a minbase Debian has no useradd.
# hadolint ignore=DL3008
RUN set -eu; \
    if ! command -v python3 >/dev/null; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 && \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    echo "gemma:x:10001:10001:gemma-export:/tmp:/usr/sbin/nologin" >> /etc/passwd; \
    echo "gemma:x:10001:" >> /etc/group
# HOME=/tmp: anything that writes a dot-file writes it to the tmpfs. No .pyc at run time
# (pip compiled them at install; the root filesystem may be read-only).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GEMMA_EXPORT_HEALTH_URL=http://127.0.0.1:8000/health
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# /health answers 200 once the model is loaded. Python's urllib: the image has no curl.
# Set GEMMA_EXPORT_HEALTH_URL when the command serves another port.
HEALTHCHECK --interval=2s --timeout=2s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GEMMA_EXPORT_HEALTH_URL'], timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gemma-export"]
CMD ["serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
# Last: root-owned, read-only to the user above.
COPY --from=builder /opt/venv /opt/venv

# --- with-model: the runtime with an artifact baked in at /model ---
# The artifact's files must be world-readable (root owns them; the server runs as 10001).
FROM runtime AS with-model
ARG ARTIFACT=artifacts/image/model
COPY ${ARTIFACT} /model
