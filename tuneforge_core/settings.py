"""Settings shared by every TuneForge process, read from TUNEFORGE_* environment variables.

Every default is an embedded one (a local folder for data and objects, SQLite, a nats-server the platform
starts itself), and every one can be pointed at real infrastructure without touching code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# Settings that carry a secret. Each may come from a file instead of the environment: TUNEFORGE_<NAME>_FILE
# names it (a Docker or compose secret under /run/secrets/, a Kubernetes secret volume), and its content,
# without the trailing newline, is the value. TUNEFORGE_<NAME> itself, when set, wins. A name counts for the
# settings classes that declare it (credentials_key: the datasets service's).
SECRET_FILE_SETTINGS = ("database_url", "nats_password", "service_token", "page_token_key", "credentials_key")


class SecretFilesSource(PydanticBaseSettingsSource):
    """The SECRET_FILE_SETTINGS whose TUNEFORGE_<NAME>_FILE variable is set, read from those files."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # every value comes from __call__

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_FILE_SETTINGS:
            variable = f"TUNEFORGE_{name.upper()}_FILE"
            path = os.environ.get(variable, "")
            if not path or name not in self.settings_cls.model_fields:
                continue
            try:
                values[name] = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{variable}: cannot read '{path}' ({exc.strerror or exc})") from None
        return values


class KitSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", env_file=None, extra="ignore")

    # Root folder for embedded state: SQLite files, the local object store, nats-server data, work dirs.
    data_dir: Path = Field(default=Path(".tuneforge"))
    # NATS server URL. Empty means: `tuneforge up` starts an embedded nats-server and fills this in.
    nats_url: str = ""
    # NATS user and password of this process (tuneforge_core.nats.connect sends them). `tuneforge up` sets
    # them for each child from the credentials it generated for its embedded nats-server ("services" for
    # the services process, "worker" for each trainer worker); with an external NATS, set them yourself
    # (empty: connect without credentials, or with those in the URL).
    nats_user: str = ""
    nats_password: str = Field(default="", repr=False)
    # SQLAlchemy URL shared by all services (each uses its own tables), e.g.
    # postgresql+psycopg://user:pass@host:5432/tuneforge. Empty: one SQLite file per service in data_dir.
    database_url: str = ""
    # Object storage: file:///abs/path for a local folder, or s3://bucket/prefix. Empty: data_dir/objects.
    storage_url: str = ""
    # S3 client settings (credentials come from the standard AWS variables or instance profiles).
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    # gRPC listen address of a service process; port 0 picks a free port.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # Log lines as "text" (the default) or "json": one JSON object a line with timestamp, level, logger,
    # message, and organization and job_id when known (tuneforge_core.logs).
    log_format: Literal["text", "json"] = "text"
    # Port of the Prometheus /metrics endpoint of a services process (services.kit.telemetry), on
    # metrics_host (empty: grpc_host). 0: no endpoint (the default, also under `tuneforge up`).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = ""
    # OpenTelemetry traces that follow a job (tuneforge_core.tracing): "off" (the default), "console" (JSON
    # on stdout), "file" (JSON lines appended to tracing_file) or "otlp" (to the collector the standard
    # OTEL_EXPORTER_OTLP_ENDPOINT names, default localhost:4317).
    tracing: Literal["off", "console", "file", "otlp"] = "off"
    tracing_file: str = ""
    # Addresses of the other services, for services that call each other. Empty: this process' own server.
    datasets_address: str = ""
    jobs_address: str = ""
    estimation_address: str = ""
    # How long a worker may go without an in-progress ack before its job is delivered to another worker.
    work_ack_wait_s: float = 60.0
    # Deliveries of a job before it is failed as WORKER_LOST.
    work_max_deliver: int = 5
    # Secret that signs page tokens (services.kit.paging); several comma-separated keys rotate: the first
    # signs, any verifies. Empty: a key generated once in data_dir/page_token.key (mode 0600). Processes
    # serving the same API behind one address need the same key.
    page_token_key: str = Field(default="", repr=False)
    # Absolute folders, comma-separated, under which a job's base model or distillation teacher may be a
    # local path (or a file:// URI); paths are compared after resolving ".." and symlinks. Empty: no local
    # paths at all, only hub ids and the organization's own outputs in object storage
    # (tuneforge_core.models says the whole rule). `tuneforge up` and the demo use <data_dir>/models.
    model_roots: str = ""

    # -- authentication (services.kit.auth) --
    # The secret the services present to each other ("authorization: Bearer <token>"); it acts in any
    # organization, so guard it like the database password. Empty: one generated once in
    # <data_dir>/secrets/service.token (mode 0600), shared by every process on that data dir.
    service_token: str = Field(default="", repr=False)
    # OIDC issuers whose bearer tokens are accepted, as a JSON list of objects (services.kit.oidc): issuer,
    # audience, jwks_url, and organization or organization_claim, role_claim, default_role.
    oidc_issuers: str = ""
    # Seconds a verified API key is trusted before it is looked up again (a revocation made through
    # another process takes effect within this time; through this one, at once).
    auth_cache_s: float = 5.0
    # Calls per second one organization may make to one service process (a burst of twice as many is
    # allowed); beyond it RESOURCE_EXHAUSTED names this setting. 0: unlimited.
    api_calls_per_second: float = 50.0
    # Streams (server-streaming and bidirectional calls: StreamMetrics, WatchJob...) one organization may
    # hold open at once on one service process; one more is RESOURCE_EXHAUSTED naming this setting. A
    # stream holds memory and a share of every point fanned out for as long as it is open. 0: unlimited.
    api_streams_per_organization: int = 2000
    # API key lifetimes: the default when CreateApiKey leaves ttl unset, and the longest allowed.
    api_key_default_ttl_days: int = 90
    api_key_max_ttl_days: int = 365
    # Where the identity service writes the default organization's first admin key (mode 0600) when the
    # file does not exist and the organization has no key yet. `tuneforge up` sets <data_dir>/admin.key.
    bootstrap_admin_key_file: str = ""
    # TLS for the gRPC server: PEM certificate chain and private key. With a client CA, clients must show
    # a certificate it signed (mutual TLS). Channels between services trust tls_ca_file (else the system
    # roots) and present the server's own certificate when a client CA is set.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_ca_file: str = ""
    # Threads each service's database calls run on (services.kit.db), apart from any other work; calls
    # beyond them wait for one. Keep it within the database's connection pool (10 + 10 overflow).
    db_workers: int = Field(default=8, gt=0)
    # How long a thread may hold the GIL while another waits for it (sys.setswitchinterval), in a service's
    # own process. Python's 5 ms made each database round trip of a metric ingest batch wait up to 5 ms
    # for the GIL while the event loop wrote to a thousand streams (services.kit.runtime.tune_interpreter).
    gil_switch_interval_ms: float = Field(default=0.5, gt=0.0, le=100.0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values, then TUNEFORGE_<NAME>, then the TUNEFORGE_<NAME>_FILE of a secret setting."""
        return (init_settings, env_settings, SecretFilesSource(settings_cls), dotenv_settings,
                file_secret_settings)

    @field_validator("model_roots")
    @classmethod
    def _absolute_roots(cls, value: str) -> str:
        for root in (r.strip() for r in value.split(",")):
            if root and not Path(root).is_absolute():
                raise ValueError(f"'{root}' is not an absolute folder (TUNEFORGE_MODEL_ROOTS)")
        return value

    def sqlite_url(self, service: str) -> str:
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def database_url_for(self, service: str) -> str:
        return self.database_url or self.sqlite_url(service)

    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "objects").resolve().as_uri()

    @classmethod
    def from_kit(cls, settings: KitSettings) -> Self:
        """The process' settings as this service's settings; its own fields come from the environment.

        The platform runner builds one KitSettings for all services; explicit kit values win over the
        environment, so nothing the runner set is lost.
        """
        if isinstance(settings, cls):
            return settings
        return cls(**settings.model_dump())
