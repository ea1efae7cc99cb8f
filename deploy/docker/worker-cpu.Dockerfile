# syntax=docker/dockerfile:1.7
# TuneForge CPU worker image: the trainer agent (`python -m trainer_worker`) with the training stack (CPU
# torch, TRL, PEFT, DeepSpeed, bitsandbytes). The serving service runs from it too (its model processes
# load torch). Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t tuneforge-worker:cpu .
#
# Base pinned by full version tag (Debian 12, CPython 3.11.14), the Python the tests run on; no digest is
# written because none could be resolved where this was written (no Docker engine); pin one with
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# As the Makefile: CPU PyTorch by default, installed first so nothing pulls a CUDA build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# g++ builds DeepSpeed from its sdist here; its CPU ops JIT-compile at first use, so the runtime keeps it.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml and pinned by the same constraints.txt as the tests: this layer
# stays cached while only our code changes. Then our code, with nothing more to resolve.
COPY constraints.txt pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in 'train,postgres'.split(',') for d in p['optional-dependencies'][e]]))" \
    > requirements.txt
RUN pip install "pip>=24" \
 && pip install "${TORCH_SPEC}" ${TORCH_INDEX} \
 && pip install -c constraints.txt -r requirements.txt
COPY gen ./gen
COPY services ./services
COPY trainer_worker ./trainer_worker
COPY tuneforge_core ./tuneforge_core
RUN pip install --no-deps -c constraints.txt ".[train,postgres]" && pip check \
 && python -c "import torch, trl, peft, deepspeed, bitsandbytes, trainer_worker.agent"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tuneforge-worker" \
      org.opencontainers.image.description="TuneForge trainer worker, CPU"
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tuneforge \
 && useradd --system --uid 10001 --gid tuneforge --home-dir /var/lib/tuneforge --shell /usr/sbin/nologin tuneforge \
 && mkdir -p /var/lib/tuneforge && chown tuneforge:tuneforge /var/lib/tuneforge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TUNEFORGE_DATA_DIR=/var/lib/tuneforge TUNEFORGE_WORKER_GPU_TYPE=cpu \
    HF_HOME=/var/lib/tuneforge/hf TORCH_EXTENSIONS_DIR=/var/lib/tuneforge/torch_extensions
WORKDIR /app
COPY deploy/docker/*.py ./deploy/docker/
USER 10001:10001
# The agent serves no port: compose and Kubernetes check that its process is alive, and the jobs service
# watches its heartbeats (tuneforge workers).
CMD ["python", "-m", "trainer_worker"]
