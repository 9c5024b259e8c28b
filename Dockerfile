# mtserve images, one multi-stage file. Build from the repository root:
#
#   docker build --target serve     -t mtserve:0.1.0        .   # CPU server (onnxruntime, no torch)
#   docker build --target serve-gpu -t mtserve:0.1.0-gpu    .   # CUDA server (onnxruntime-gpu)
#   docker build --target train     -t mtserve-train:0.1.0  .   # torch (CPU wheels) + timm: train/export
#
# Needs BuildKit (`COPY --chmod`, `RUN --mount`): Docker 23+ uses it by default; Docker 20.10-22
# needs DOCKER_BUILDKIT=1. There is deliberately no `# syntax=` line: the Dockerfile frontend
# built into the engine is used, so offline and mirrored sites build without pulling
# docker/dockerfile from Docker Hub.
#
# The servers read their bundle from MTSERVE_BUNDLE (default /models/bundle: mount it there,
# read-only) and listen on MTSERVE_HOST:MTSERVE_PORT (0.0.0.0:8000). Every server setting is an
# MTSERVE_* environment variable (service/settings.py); CMD passes no flags, so `docker run -e`
# and compose/Kubernetes `environment:` take effect.
#
# Dependencies are pinned by deploy/docker/constraints.txt (generated from pyproject.toml; see
# docs/deploy.md, "Dependency lock"): the same versions on every build.
#
# Layer caching: each image first installs the dependencies listed in pyproject.toml (only
# pyproject.toml and the lock are copied for that step), then installs the mtserve wheel
# without dependencies. Editing code rebuilds only the small last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu >= 1.27 on PyPI is built against CUDA 13.x + cuDNN 9.x (its `cuda` extra
# requires nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0; the provider library links
# libcudart.so.13 / libcublas.so.13). 1.19-1.26 were CUDA 12.x + cuDNN 9.x. CUDA minor-version
# compatibility makes any 13.x runtime work; 13.0 needs the lowest host driver (>= 580).
# For hosts with an older driver (>= 525) build with:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04 --build-arg ORT_GPU_VERSION=1.26.0
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ORT_GPU_VERSION=1.31.1
# CPU-only torch wheels (about 0.2 GB instead of several GB of CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Non-root user and group shared by every image (both 10001, both with a passwd/group entry): a
# volume written by `train` is readable by `serve`.
ARG APP_UID=10001
ARG APP_GID=10001

# ---------------------------------------------------------------------------------------------
# base: a Python with a virtual environment at /opt/venv and a tool that turns pyproject.toml
# into a requirements list (core dependencies + chosen extras), so the dependency layer can be
# built before any code is copied.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
# ORT_DISABLE_TELEMETRY: onnxruntime's telemetry stays off in every process of the image (the
# server also calls onnxruntime.disable_telemetry_events() at start-up).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ORT_DISABLE_TELEMETRY=1
RUN python -m venv /opt/venv
COPY --chmod=0755 deploy/docker/requirements_from_pyproject.py /usr/local/bin/requirements-from-pyproject
WORKDIR /src

# ---------------------------------------------------------------------------------------------
# wheel: the mtserve wheel itself (pure Python; installs the same on 3.11 and 3.12).
# ---------------------------------------------------------------------------------------------
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY models ./models
COPY service ./service
COPY training ./training
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# serve: CPU server. python slim + onnxruntime + fastapi/uvicorn. No torch, no compiler.
# ---------------------------------------------------------------------------------------------
FROM base AS serve
ARG APP_UID
ARG APP_GID
COPY pyproject.toml deploy/docker/constraints.txt /tmp/
RUN requirements-from-pyproject /tmp/pyproject.toml serve > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt /tmp/pyproject.toml
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
RUN groupadd --system --gid "${APP_GID}" mtserve \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin mtserve \
    && mkdir -p /models \
    && chown "${APP_UID}:${APP_GID}" /models
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/mtserve-healthcheck
WORKDIR /models
USER ${APP_UID}:${APP_GID}
ENV MTSERVE_BUNDLE=/models/bundle \
    MTSERVE_HOST=0.0.0.0 \
    MTSERVE_PORT=8000
EXPOSE 8000
# Liveness only (/healthz). Readiness (/readyz) is for load balancers: Kubernetes probes it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/mtserve-healthcheck"]
ENTRYPOINT ["mtserve"]
# No flags: flags win over MTSERVE_* variables, so every setting stays an environment variable.
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# serve-gpu: the same server on NVIDIA's CUDA + cuDNN runtime image with onnxruntime-gpu.
# Ubuntu 24.04 brings Python 3.12 (the project needs >= 3.11).
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve-gpu
ARG APP_UID
ARG APP_GID
ARG ORT_GPU_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ORT_DISABLE_TELEMETRY=1
# Package versions come from the pinned base image's Ubuntu release; pinning each apt package
# too would break the build on every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --chmod=0755 deploy/docker/requirements_from_pyproject.py /usr/local/bin/requirements-from-pyproject
COPY pyproject.toml deploy/docker/constraints.txt /tmp/
# The `gpu` extra lists onnxruntime-gpu (never together with onnxruntime: both install the
# module `onnxruntime`); ORT_GPU_VERSION replaces the lock's onnxruntime-gpu pin, to match CUDA_IMAGE.
RUN requirements-from-pyproject /tmp/pyproject.toml gpu > /tmp/requirements.txt \
    && grep -v '^onnxruntime-gpu==' /tmp/constraints.txt > /tmp/gpu-constraints.txt \
    && echo "onnxruntime-gpu==${ORT_GPU_VERSION}" >> /tmp/gpu-constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/gpu-constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt /tmp/gpu-constraints.txt /tmp/pyproject.toml
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
RUN groupadd --system --gid "${APP_GID}" mtserve \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin mtserve \
    && mkdir -p /models \
    && chown "${APP_UID}:${APP_GID}" /models
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/mtserve-healthcheck
WORKDIR /models
USER ${APP_UID}:${APP_GID}
ENV MTSERVE_BUNDLE=/models/bundle \
    MTSERVE_HOST=0.0.0.0 \
    MTSERVE_PORT=8000 \
    MTSERVE_DEVICE=cuda
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/mtserve-healthcheck"]
ENTRYPOINT ["mtserve"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# train: torch (CPU wheels) + timm + onnx exporter. Builds bundles, e.g. the demo bundle:
#   docker run --rm -v models:/models mtserve-train:0.1.0 build-demo-bundle /models/bundle
# ---------------------------------------------------------------------------------------------
FROM base AS train
ARG APP_UID
ARG APP_GID
ARG TORCH_INDEX_URL
COPY pyproject.toml deploy/docker/constraints.txt /tmp/
# torch/torchvision first, from the CPU index; the rest (timm, onnx, ...) from PyPI. The
# pyproject bound `torch<=X` matches `X+cpu` (local version labels are ignored when comparing).
# `serve` too: the exporter checks every ONNX file against torch in onnxruntime.
# animal-mnist (one of the demo data sources) is installed without its dependencies, as
# scripts/serve-demo.sh does.
# The lock pins torch==X: that matches the CPU index's X+cpu (a local version label is ignored
# when the pin has none), and the second step keeps it instead of pulling CUDA torch from PyPI.
RUN requirements-from-pyproject /tmp/pyproject.toml train --only torch torchvision > /tmp/torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt -c /tmp/constraints.txt \
    && requirements-from-pyproject /tmp/pyproject.toml train serve > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && pip install --no-deps "animal-mnist==0.4" \
    && rm /tmp/torch.txt /tmp/requirements.txt /tmp/constraints.txt /tmp/pyproject.toml
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
RUN groupadd --system --gid "${APP_GID}" mtserve \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --create-home --home-dir /home/mtserve \
        --shell /usr/sbin/nologin mtserve \
    && mkdir -p /models /work \
    && chown "${APP_UID}:${APP_GID}" /models /work
COPY training/configs /opt/mtserve/training/configs
COPY --chmod=0755 deploy/docker/build-demo-bundle.sh /usr/local/bin/build-demo-bundle
WORKDIR /work
USER ${APP_UID}:${APP_GID}
ENTRYPOINT []
CMD ["build-demo-bundle", "/models/bundle"]
