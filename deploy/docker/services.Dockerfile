# syntax=docker/dockerfile:1.7
# TuneForge services image: the gRPC services (identity, datasets, jobs, estimation, metrics) and the
# migrations step. No torch: the services never import it (the serving service's model processes do, so
# it runs from a worker image). Build from the repository root:
#   docker build -f deploy/docker/services.Dockerfile -t tuneforge-services:dev .
#
# Base pinned by full version tag (Debian 12 "bookworm", CPython 3.11.14), the Python the tests run on.
# No digest is written here because none could be resolved on the machine this file was written on (no
# Docker engine, no registry access); pin one with `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml and pinned by the same constraints.txt as the tests: this layer
# stays cached while only our code changes. Then our code, with nothing more to resolve.
COPY constraints.txt pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in 'postgres'.split(',') for d in p['optional-dependencies'][e]]))" \
    > requirements.txt
RUN pip install "pip>=24" && pip install -c constraints.txt -r requirements.txt
COPY gen ./gen
COPY services ./services
COPY trainer_worker ./trainer_worker
COPY tuneforge_core ./tuneforge_core
RUN pip install --no-deps -c constraints.txt ".[postgres]" && pip check \
 && python -c "import grpc_health.v1.health_pb2_grpc, psycopg, services.platform.components" \
 && ! python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tuneforge-services" \
      org.opencontainers.image.description="TuneForge gRPC services (no training stack)"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TUNEFORGE_DATA_DIR=/var/lib/tuneforge TUNEFORGE_GRPC_HOST=0.0.0.0 TUNEFORGE_GRPC_PORT=50051 \
    HF_HOME=/var/lib/tuneforge/hf
RUN groupadd --system --gid 10001 tuneforge \
 && useradd --system --uid 10001 --gid tuneforge --home-dir /var/lib/tuneforge --shell /usr/sbin/nologin tuneforge \
 && mkdir -p /var/lib/tuneforge && chown tuneforge:tuneforge /var/lib/tuneforge
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The migrations step (docker-compose.yml service "migrations") and the gRPC health probe.
COPY deploy/docker/*.py ./deploy/docker/
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
  CMD ["python", "deploy/docker/healthcheck.py"]
# One service per container: override with `python -m services.<name>`; the default hosts all of them.
CMD ["python", "-m", "services.platform"]
