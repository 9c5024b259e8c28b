# syntax=docker/dockerfile:1.7
#
# mtserve images, one multi-stage file. Build from the repository root:
#
#   docker build --target serve     -t mtserve:0.1.0        .   # CPU server (onnxruntime, no torch)
#   docker build --target serve-gpu -t mtserve:0.1.0-gpu    .   # CUDA server (onnxruntime-gpu)
#   docker build --target train     -t mtserve-train:0.1.0  .   # torch (CPU wheels) + timm: train/export
#
# The servers read their bundle from /models/bundle (mount it there, read-only) and listen on
# 0.0.0.0:8000. Every server setting is an MTSERVE_* environment variable (service/settings.py).
#
# Layer caching: each image first installs the dependencies listed in pyproject.toml (only
# pyproject.toml is copied for that step), then installs the mtserve wheel without
# dependencies. Editing code rebuilds only the small last layers.

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

# Non-root user shared by every image: a volume written by `train` is readable by `serve`.
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------
# base: a Python with a virtual environment at /opt/venv and a tool that turns pyproject.toml
# into a requirements list (core dependencies + chosen extras), so the dependency layer can be
# built before any code is copied.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY --chmod=0755 deploy/docker/requirements_from_pyproject.py /usr/local/bin/requirements-from-pyproject
WORKDIR /src

# ---------------------------------------------------------------------------------------------
# wheel: the mtserve wheel itself (pure Python; installs the same on 3.11 and 3.12).
# ---------------------------------------------------------------------------------------------
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY training ./training
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# serve: CPU server. python slim + onnxruntime + fastapi/uvicorn. No torch, no compiler.
# ---------------------------------------------------------------------------------------------
FROM base AS serve
ARG APP_UID
COPY pyproject.toml /tmp/pyproject.toml
RUN requirements-from-pyproject /tmp/pyproject.toml serve > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
RUN useradd --system --uid "${APP_UID}" --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin mtserve \
    && mkdir -p /models \
    && chown "${APP_UID}:${APP_UID}" /models
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/mtserve-healthcheck
WORKDIR /models
USER ${APP_UID}:${APP_UID}
ENV MTSERVE_HOST=0.0.0.0 \
    MTSERVE_PORT=8000
EXPOSE 8000
# Liveness only (/healthz). Readiness (/readyz) is for load balancers: Kubernetes probes it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/mtserve-healthcheck"]
ENTRYPOINT ["mtserve"]
CMD ["serve", "/models/bundle", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------------
# serve-gpu: the same server on NVIDIA's CUDA + cuDNN runtime image with onnxruntime-gpu.
# Ubuntu 24.04 brings Python 3.12 (the project needs >= 3.11).
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve-gpu
ARG APP_UID
ARG ORT_GPU_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Package versions come from the pinned base image's Ubuntu release; pinning each apt package
# too would break the build on every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --chmod=0755 deploy/docker/requirements_from_pyproject.py /usr/local/bin/requirements-from-pyproject
COPY pyproject.toml /tmp/pyproject.toml
# The `gpu` extra lists onnxruntime-gpu (never together with onnxruntime: both install the
# module `onnxruntime`); the constraint pins the release that matches CUDA_IMAGE.
RUN requirements-from-pyproject /tmp/pyproject.toml gpu > /tmp/requirements.txt \
    && echo "onnxruntime-gpu==${ORT_GPU_VERSION}" > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt /tmp/pyproject.toml
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
RUN useradd --system --uid "${APP_UID}" --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin mtserve \
    && mkdir -p /models \
    && chown "${APP_UID}:${APP_UID}" /models
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/mtserve-healthcheck
WORKDIR /models
USER ${APP_UID}:${APP_UID}
ENV MTSERVE_HOST=0.0.0.0 \
    MTSERVE_PORT=8000 \
    MTSERVE_DEVICE=cuda
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/mtserve-healthcheck"]
ENTRYPOINT ["mtserve"]
CMD ["serve", "/models/bundle", "--host", "0.0.0.0", "--device", "cuda"]

# ---------------------------------------------------------------------------------------------
# train: torch (CPU wheels) + timm + onnx exporter. Builds bundles, e.g. the demo bundle:
#   docker run --rm -v models:/models mtserve-train:0.1.0 build-demo-bundle /models/bundle
# ---------------------------------------------------------------------------------------------
FROM base AS train
ARG APP_UID
ARG TORCH_INDEX_URL
COPY pyproject.toml /tmp/pyproject.toml
# torch/torchvision first, from the CPU index; the rest (timm, onnx, ...) from PyPI. The
# pyproject bound `torch<=X` matches `X+cpu` (local version labels are ignored when comparing).
# `serve` too: the exporter checks every ONNX file against torch in onnxruntime.
# animal-mnist (one of the demo data sources) is installed without its dependencies, as
# scripts/serve-demo.sh does.
RUN requirements-from-pyproject /tmp/pyproject.toml train --only torch torchvision > /tmp/torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
    && requirements-from-pyproject /tmp/pyproject.toml train serve > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps "animal-mnist==0.4" \
    && rm /tmp/torch.txt /tmp/requirements.txt /tmp/pyproject.toml
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
RUN useradd --system --uid "${APP_UID}" --user-group --create-home --home-dir /home/mtserve \
        --shell /usr/sbin/nologin mtserve \
    && mkdir -p /models /work \
    && chown "${APP_UID}:${APP_UID}" /models /work
COPY training/configs /opt/mtserve/training/configs
COPY --chmod=0755 deploy/docker/build-demo-bundle.sh /usr/local/bin/build-demo-bundle
WORKDIR /work
USER ${APP_UID}:${APP_UID}
ENTRYPOINT []
CMD ["build-demo-bundle", "/models/bundle"]
