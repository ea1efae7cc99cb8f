# syntax=docker/dockerfile:1.7
# TuneForge CUDA worker image (`tuneforge-worker:cuda`, the image docs/multinode.md names): the trainer
# agent with CUDA torch, TRL, PEFT, DeepSpeed, bitsandbytes and, where it builds, flash-attention.
# Build from the repository root (it needs no GPU to build):
#   docker build -f deploy/docker/worker-cuda.Dockerfile -t tuneforge-worker:cuda .
#
# Bases pinned by full version tag: CUDA 12.8.1 with cuDNN on Ubuntu 24.04 (CPython 3.12, within the
# project's >=3.11,<3.13); the devel image compiles DeepSpeed's and flash-attention's CUDA ops, the
# runtime image carries only the libraries. No digest is written because none could be resolved where
# this was written (no Docker engine); pin one with `docker buildx imagetools inspect <image>`.
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_DEVEL_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128
# 0 skips flash-attention (its build takes long and needs much memory: MAX_JOBS limits the compilers).
ARG FLASH_ATTN=1
ARG MAX_JOBS=4
# The GPU architectures to compile DeepSpeed's ops for when they are built ahead of first use.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive \
    MAX_JOBS=${MAX_JOBS} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml and pinned by the same constraints.txt as the tests: this layer
# stays cached while only our code changes. Then our code, with nothing more to resolve.
COPY constraints.txt pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in 'train,postgres'.split(',') for d in p['optional-dependencies'][e]]))" \
    > requirements.txt
RUN pip install "pip>=24" wheel packaging ninja \
 && pip install "${TORCH_SPEC}" ${TORCH_INDEX} \
 && pip install -c constraints.txt -r requirements.txt
COPY gen ./gen
COPY services ./services
COPY trainer_worker ./trainer_worker
COPY tuneforge_core ./tuneforge_core
RUN pip install --no-deps -c constraints.txt ".[train,postgres]" && pip check \
 && python -c "import torch, trl, peft, deepspeed, bitsandbytes, trainer_worker.agent"
# flash-attention where it installs: a wheel or a build against the torch above. The recipes do not ask
# for it today (they train with transformers' default attention, PyTorch SDPA), so a failure leaves the
# image without it and says so in the build log instead of failing the build.
RUN if [ "${FLASH_ATTN}" = "1" ]; then \
      pip install --no-build-isolation flash-attn \
      || echo "flash-attn did not install: the image has no flash-attention"; \
    fi

FROM ${CUDA_RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tuneforge-worker" \
      org.opencontainers.image.description="TuneForge trainer worker, NVIDIA CUDA 12.8"
ENV DEBIAN_FRONTEND=noninteractive
# python3 is the interpreter the venv was made with; g++ and the CUDA headers are not needed for the
# prebuilt ops, but DeepSpeed JIT-compiles the others: use the devel image as runtime if you need them.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tuneforge \
 && useradd --system --uid 10001 --gid tuneforge --home-dir /var/lib/tuneforge --shell /usr/sbin/nologin tuneforge \
 && mkdir -p /var/lib/tuneforge && chown tuneforge:tuneforge /var/lib/tuneforge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TUNEFORGE_DATA_DIR=/var/lib/tuneforge HF_HOME=/var/lib/tuneforge/hf \
    TORCH_EXTENSIONS_DIR=/var/lib/tuneforge/torch_extensions \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
COPY deploy/docker/*.py ./deploy/docker/
USER 10001:10001
CMD ["python", "-m", "trainer_worker"]
