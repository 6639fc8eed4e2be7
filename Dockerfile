# dsi: one image for every role. The entrypoint is `dsi`, so the first
# argument picks it: `dsi target ...`, `dsi drafter ...`, `dsi coordinator ...`.
# No model is baked in: models are mounted (see k8s/ and docs/deploy.md).
#
# Two variants, chosen with --build-arg VARIANT (the torch wheel decides what
# the image can run on; the choice is explicit):
#   cpu  (default)  python:3.12-slim + torch's CPU-only wheel from the PyTorch
#                   CPU index (no CUDA libraries: a much smaller image).
#                   Synthetic models, CPU models, the coordinator.
#   cuda            NVIDIA's CUDA runtime image (Ubuntu 24.04, Python 3.12) +
#                   torch's default PyPI wheel, which is built for CUDA and
#                   brings its own CUDA libraries as nvidia-* wheels (several
#                   GB). The base supplies the NVIDIA container-runtime
#                   settings; the node's driver must support torch's CUDA.
#
#   docker build -t dsi:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t dsi:0.1.0-cuda .
#
# Other build arguments: TORCH_VERSION, TORCH_INDEX_URL (overrides the
# variant's index, e.g. https://download.pytorch.org/whl/cu128 for a given
# CUDA build), PYTHON_IMAGE, CUDA_IMAGE (keep both on the same Python minor).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --- operating system + Python, per variant ---------------------------------------
FROM ${PYTHON_IMAGE} AS os-cpu

FROM ${CUDA_IMAGE} AS os-cuda
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM os-${VARIANT} AS os
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- build: a virtual environment with torch and dsi ---------------------------------
FROM os AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN python3 -m venv /opt/dsi
ENV PATH=/opt/dsi/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least.
RUN set -eu; \
    index="$TORCH_INDEX_URL"; \
    if [ -z "$index" ]; then \
        case "$VARIANT" in \
            cpu) index=https://download.pytorch.org/whl/cpu ;; \
            cuda) index=https://pypi.org/simple ;; \
            *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
        esac; \
    fi; \
    pip install --index-url "$index" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dsi ./dsi
COPY services ./services
# A regular (not editable) install: the runtime stage needs no source tree.
RUN pip install . \
    && dsi --version \
    && python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# --- runtime -------------------------------------------------------------------------
FROM os AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="dsi" \
      org.opencontainers.image.description="Distributed Speculative Inference over gRPC: target, drafter and coordinator" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric non-root user (the manifests' runAsUser), and /cache for
# the caches: with a read-only root filesystem, Kubernetes mounts emptyDirs on
# /tmp and /cache.
RUN groupadd --system --gid 10001 dsi \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dsi --create-home --shell /usr/sbin/nologin dsi \
    && mkdir -p /cache \
    && chown 10001:10001 /cache
COPY --from=build /opt/dsi /opt/dsi
# dsi never downloads a model: offline Hugging Face libraries, caches in /cache,
# and no progress bars in the (JSON) logs.
ENV PATH=/opt/dsi/bin:$PATH \
    HOME=/home/dsi \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    DSI_IMAGE_VARIANT=${VARIANT}
USER 10001:10001
WORKDIR /home/dsi
# coordinator, target, drafter (the CLI's defaults)
EXPOSE 50050 50051 50052
ENTRYPOINT ["dsi"]
CMD ["--help"]
