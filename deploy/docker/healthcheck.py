"""Container health check: the gRPC health service of this container's process says SERVING.

`python deploy/docker/healthcheck.py [ADDRESS]`; the address defaults to 127.0.0.1 and TUNEFORGE_GRPC_PORT
(50051). Exit 0 when SERVING, 1 otherwise, with one line on stderr. grpcio's own health stub, so the images
need no grpc_health_probe binary. Health is open to unauthenticated calls (services.kit.auth); a server
with TLS is asked over TLS, trusting TUNEFORGE_TLS_CA_FILE.

`python deploy/docker/healthcheck.py --nats`: for a worker, which serves no port: healthy while the NATS
server of TUNEFORGE_NATS_URL answers (it greets every connection with an INFO line).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def nats_answers(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the first server of a NATS URL list greets a new connection with INFO."""
    parsed = urlparse(url.split(",")[0].strip())
    try:
        address = (parsed.hostname or "127.0.0.1", parsed.port or 4222)
        with socket.create_connection(address, timeout_s) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["--nats"]:
        url = os.environ.get("TUNEFORGE_NATS_URL", "")
        if url and nats_answers(url):
            return 0
        print(f"unhealthy: NATS at '{url}' does not answer", file=sys.stderr)
        return 1
    address = argv[0] if argv else f"127.0.0.1:{os.environ.get('TUNEFORGE_GRPC_PORT', '50051')}"
    if os.environ.get("TUNEFORGE_TLS_CERT_FILE"):
        ca_file = os.environ.get("TUNEFORGE_TLS_CA_FILE", "")
        root = Path(ca_file).read_bytes() if ca_file else None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root))
    else:
        channel = grpc.insecure_channel(address)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    except grpc.RpcError as exc:
        print(f"unhealthy: {address}: {exc.code().name}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
