"""`python -m services.gateway`: the HTTP/JSON gateway in front of the services' gRPC address.

Settings (environment): TUNEFORGE_HTTP_HOST / TUNEFORGE_HTTP_PORT (default 127.0.0.1:8080; port 0 picks a
free one), TUNEFORGE_GATEWAY_GRPC_TARGET (default TUNEFORGE_GRPC_HOST:TUNEFORGE_GRPC_PORT, loopback when
the services listen on every address), TUNEFORGE_HTTP_MAX_BODY_BYTES (largest JSON body; uploads stream
and are not bound by it).

TLS: with TUNEFORGE_TLS_CERT_FILE and TUNEFORGE_TLS_KEY_FILE (the services' own TLS settings) the gateway
serves HTTPS with that certificate, and its channel to the services uses TLS the way the services' own
channels do (trusting TUNEFORGE_TLS_CA_FILE, showing the certificate where TUNEFORGE_TLS_CLIENT_CA_FILE
asks for one). HTTP clients are not asked for certificates: they authenticate with their API key.

Writes its URL to $TUNEFORGE_READY_FILE once it listens. A taken address ends the process with
EXIT_ADDRESS_IN_USE and one line on stderr.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web
from pydantic import Field

from services.gateway.app import DEFAULT_MAX_BODY_BYTES, create_app, create_runner
from services.kit.runtime import (
    EXIT_ADDRESS_IN_USE,
    channel_credentials,
    configure_logging,
    is_loopback,
    tls_enabled,
)
from tuneforge_core.settings import KitSettings

log = logging.getLogger("services.gateway")


class GatewaySettings(KitSettings):
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    gateway_grpc_target: str = ""

    def grpc_target(self) -> str:
        if self.gateway_grpc_target:
            return self.gateway_grpc_target
        host = self.grpc_host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.grpc_port}"


def url_of(host: str, port: int, *, tls: bool = False) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """HTTPS with the services' certificate, or None without TLS settings."""
    if not tls_enabled(settings):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def _write_ready(path: Path, url: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(url)
    tmp.replace(path)


async def serve(settings: GatewaySettings) -> None:
    app = create_app(settings.grpc_target(), channel_credentials(settings),
                     max_body_bytes=settings.http_max_body_bytes)
    runner = create_runner(app)
    await runner.setup()
    tls = ssl_context(settings)
    site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=False, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            print(f"error: address {settings.http_host}:{settings.http_port} is already in use (choose "
                  "another with --http-port or TUNEFORGE_HTTP_PORT)", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_ADDRESS_IN_USE) from None
        print(f"error: cannot listen on {settings.http_host}:{settings.http_port}: {exc.strerror}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    port = settings.http_port
    for address in runner.addresses:  # the bound port, for port 0
        port = int(address[1])
        break
    url = url_of(settings.http_host, port, tls=tls is not None)
    if tls is None and not is_loopback(settings.http_host):
        log.warning("the HTTP gateway listens on %s without TLS: API keys travel in plaintext; put a "
                    "TLS-terminating proxy in front of it", settings.http_host)
    ready_file = os.environ.get("TUNEFORGE_READY_FILE")
    if ready_file:
        _write_ready(Path(ready_file), url)
    log.info("HTTP gateway on %s -> gRPC %s", url, settings.grpc_target())  # as JSON with the JSON log format
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
