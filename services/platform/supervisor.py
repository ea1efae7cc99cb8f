"""Starts and stops the whole platform on embedded defaults: what `tuneforge up`, `make demo` and the
end-to-end tests run.

Processes: a nats-server (unless a NATS URL is given), one services process hosting the four services,
the HTTP/JSON gateway (services.gateway: REST routes, OpenAPI and the web console, a gRPC client of the
services on `http_host:http_port`; `Platform.http_url` once started), and N trainer workers. Each
default (NATS, database, storage) can point at real infrastructure through the same TUNEFORGE_* variables
the services read.

One platform per data dir: `Platform.start` takes an exclusive lock (flock) on <data_dir>/platform.lock,
which holds the supervisor's pid, and a second platform on the same data dir fails at once naming that
pid. The children inherit the locked descriptor, so the lock is free only once the supervisor *and* every
child it started are gone: a platform started right after another one's supervisor was killed waits a few
seconds for the old children to go instead of sharing the port and the JetStream folder with them.

Children die with the supervisor however it dies (SIGKILL included): on Linux each gets SIGTERM when the
supervisor dies (PR_SET_PDEATHSIG), so the services stop serving, a worker hands its job back and stops its
training process, and the nats-server shuts down cleanly. The signal follows the thread that started the
child: call `start` and `supervise` from the main thread (as `tuneforge up` does), not from a thread that
ends before the platform stops.

NATS credentials: the embedded nats-server refuses anonymous connections. Its two users' passwords are
generated once into <data_dir>/nats/auth/ (mode 0600); the services process gets the "services" user's
(TUNEFORGE_NATS_USER / TUNEFORGE_NATS_PASSWORD) and each worker the "worker" user's, which may only do what
a worker does (tuneforge_core.nats.worker_permissions); neither gets the other's. With an external NATS
(a NATS URL given) the children get whatever credentials the environment holds.

Supervision: `Platform.supervise()`, called every half second by `tuneforge up`, restarts a worker that
died (same worker id setting, same log file), the services process if it died (on the same address: the
same ready-file handshake as at start, then clients simply reconnect), and the embedded nats-server if it
died (same port and JetStream folder, so every client reconnects by itself and nothing queued is lost),
and returns one line per death and restart for the caller to print; the lines also go to
logs/platform.log. A child that keeps dying soon after it started is restarted less and less often
(doubling from `restart_delay_s` up to a minute), so a broken setup does not spin. `check_alive` reports
only what a restart cannot mend: the services' address taken by another process.

Local base models: unless TUNEFORGE_MODEL_ROOTS is set (in the environment or `PlatformConfig.env`), the
embedded platform allows the folders under `<data_dir>/models` and nothing else on its disk
(tuneforge_core.models has the rule).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from services.kit.embedded import EmbeddedNats, NatsAuth, die_with_parent
from services.kit.runtime import EXIT_ADDRESS_IN_USE, AddressInUse, check_address
from tuneforge_core.nats import SERVICES_USER, WORKER_USER


class PlatformStartError(RuntimeError):
    """The platform did not come up; the message says why in a sentence fit for a user."""


_HINT = " (another TuneForge may be running there; choose another with --port or TUNEFORGE_GRPC_PORT)"
# The line a service process that could not listen ends with (services.kit.runtime.run_until_stopped).
_TAKEN = re.compile(r"address (\S+) is already in use")
# The other ports the services process listens on, by the setting that chooses each.
_PORT_SETTINGS = ("TUNEFORGE_METRICS_PORT", "TUNEFORGE_DOWNLOAD_PORT", "TUNEFORGE_SERVING_PORT")


@dataclass
class PlatformConfig:
    data_dir: Path
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # The HTTP/JSON gateway's address. None: 8080, or any free port when grpc_port is 0 (tests, the demo)
    # so that platforms started side by side never share a port. `http=False` starts no gateway.
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    http: bool = True
    nats_url: str = ""
    workers: int = 1
    # Extra TUNEFORGE_* (or other) variables for every child, e.g. DATABASE_URL, STORAGE_URL.
    env: dict[str, str] = field(default_factory=dict)
    # Seconds before the first restart of a child that died; doubles while it keeps dying soon after
    # each start, up to MAX_RESTART_DELAY_S.
    restart_delay_s: float = 1.0


# What a worker never gets (it runs user jobs): the database, the service token, the keys that seal import
# credentials and sign page tokens, TLS private keys, identity settings.
WORKER_WITHHELD = ("TUNEFORGE_DATABASE_URL", "TUNEFORGE_SERVICE_TOKEN", "TUNEFORGE_CREDENTIALS_KEY",
                   "TUNEFORGE_PAGE_TOKEN_KEY", "TUNEFORGE_TLS_KEY_FILE", "TUNEFORGE_TLS_CLIENT_CA_FILE",
                   "TUNEFORGE_OIDC_ISSUERS", "TUNEFORGE_BOOTSTRAP_ADMIN_KEY_FILE")

# What the HTTP gateway never gets: it is a gRPC client carrying each caller's own key, so none of the
# services' secrets and no NATS credentials (it has no NATS user). It keeps the TLS files: with TLS its
# channel to the services is TLS too, and with a client CA it shows the services' certificate, as the
# services' own channels do (services.kit.runtime.channel_credentials).
GATEWAY_WITHHELD = (*(name for name in WORKER_WITHHELD if not name.startswith("TUNEFORGE_TLS_")),
                    "TUNEFORGE_PAGE_TOKEN_KEY_FILE", "TUNEFORGE_SERVICE_TOKEN_FILE",
                    "TUNEFORGE_DATABASE_URL_FILE", "TUNEFORGE_CREDENTIALS_KEY_FILE", "TUNEFORGE_NATS_USER",
                    "TUNEFORGE_NATS_PASSWORD", "TUNEFORGE_NATS_PASSWORD_FILE")

# Where the embedded platform keeps the first admin key of the default organization (mode 0600); the CLI
# reads it from the same data dir when TUNEFORGE_API_KEY is not set.
ADMIN_KEY_FILE = "admin.key"

# The data-dir lock (holds the supervisor's pid) and the folder of the embedded nats-server's credentials.
LOCK_FILE = "platform.lock"
NATS_AUTH_DIR = Path("nats") / "auth"
NATS_CREDENTIAL_VARS = ("TUNEFORGE_NATS_USER", "TUNEFORGE_NATS_PASSWORD")
# How long a new platform waits for the lock when the supervisor that holds it has died (its children are
# still stopping); a live holder fails the start at once.
ORPHAN_LOCK_WAIT_S = 30.0
# What every child gets when the supervisor dies: a clean stop, not a kill.
PARENT_DEATH_SIGNAL = signal.SIGTERM

# A child that ran this long before it died is restarted after restart_delay_s again, not after longer.
STABLE_AFTER_S = 60.0
MAX_RESTART_DELAY_S = 60.0
# Restarts of the services process in a row that found its address taken by another process: then the
# platform stops (check_alive), since clients of that address would reach someone else.
MAX_ADDRESS_IN_USE = 3


class _Nats(EmbeddedNats):
    """The embedded nats-server, plus whether it still runs (EmbeddedNats does not say)."""

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None


@dataclass
class _Restarts:
    """When a supervised child last started, and when it may start again after dying."""

    delay_s: float
    started_at: float = field(default_factory=time.monotonic)
    due_at: float | None = None  # set while it is dead and waiting to be restarted
    count: int = 0

    def schedule(self, now: float, base_s: float) -> float:
        """The delay before the next start: the base again after a long run, else twice the last one."""
        self.delay_s = base_s if now - self.started_at >= STABLE_AFTER_S else min(
            MAX_RESTART_DELAY_S, self.delay_s * 2 if self.count else base_s)
        self.due_at = now + self.delay_s
        return self.delay_s

    def started(self, now: float) -> None:
        self.started_at, self.due_at, self.count = now, None, self.count + 1


@dataclass
class _WorkerSlot:
    index: int
    worker_id: str
    restarts: _Restarts


class Platform:
    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.nats: _Nats | None = None
        self.nats_url = config.nats_url
        self.address = ""
        self.services: subprocess.Popen[bytes] | None = None
        self.http_url = ""  # the gateway's URL once it serves, e.g. http://127.0.0.1:8080
        self.gateway: subprocess.Popen[bytes] | None = None
        self._gateway_restarts = _Restarts(config.restart_delay_s)
        self._gateway_serving = False
        # One entry per worker slot; a restarted worker replaces its slot's process.
        self.workers: list[subprocess.Popen[bytes]] = []
        self._slots: list[_WorkerSlot] = []
        self._nats_restarts = _Restarts(config.restart_delay_s)
        self._services_restarts = _Restarts(config.restart_delay_s)
        self._services_serving = False  # whether the current services process wrote its address
        self._address_in_use = 0  # restarts in a row that found the address taken
        self._fatal: str | None = None
        self.logs_dir = self.data_dir / "logs"
        self.nats_auth: NatsAuth | None = None
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.data_dir / LOCK_FILE

    def child_env(self, nats_user: str = "") -> dict[str, str]:
        """The environment of a child; with the embedded nats-server, `nats_user`'s credentials and no
        other's (none for an empty `nats_user`)."""
        env = dict(os.environ)
        env.update({
            "TUNEFORGE_DATA_DIR": str(self.data_dir),
            "TUNEFORGE_NATS_URL": self.nats_url,
            "TUNEFORGE_GRPC_HOST": self.config.grpc_host,
            "TUNEFORGE_GRPC_PORT": str(self.config.grpc_port),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        })
        env.setdefault("TUNEFORGE_MODEL_ROOTS", str(self.data_dir / "models"))
        # The identity service creates the default organization's first admin key here, once.
        env.setdefault("TUNEFORGE_BOOTSTRAP_ADMIN_KEY_FILE", str(self.data_dir / ADMIN_KEY_FILE))
        env.update(self.config.env)
        if self.nats_auth is not None:
            for name in NATS_CREDENTIAL_VARS:
                env.pop(name, None)
            if nats_user:
                env.update(self.nats_auth.env(nats_user))
        return env

    def _spawn(self, args: list[str], log_name: str, extra_env: dict[str, str] | None = None, *,
               nats_user: str = "", withhold: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.child_env(nats_user), **(extra_env or {})}
        for name in withhold:
            env.pop(name, None)
        with open(self.logs_dir / log_name, "ab") as log:
            return subprocess.Popen([sys.executable, *args],
                                    env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    pass_fds=self._inherited_fds(),
                                    preexec_fn=die_with_parent(PARENT_DEATH_SIGNAL))

    def _inherited_fds(self) -> tuple[int, ...]:
        return (self._lock_fd,) if self._lock_fd is not None else ()

    def _lock(self) -> None:
        """Takes the data dir's lock, or raises PlatformStartError naming the TuneForge that holds it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + ORPHAN_LOCK_WAIT_S
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _read_pid(fd)
                    # A dead holder's children still hold it while they stop: wait for them a little.
                    if _alive(holder) or time.monotonic() > deadline:
                        who = f"pid {holder}" if holder else "pid unknown"
                        gone, advice = ("", "stop it first") if _alive(holder) else _orphans(self.lock_path)
                        raise PlatformStartError(
                            f"another TuneForge ({who}{gone}) holds {self.data_dir} (lock "
                            f"{self.lock_path}); {advice}, or choose another --data-dir") from None
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes once the children that inherited it are gone too
            self._lock_fd = None

    def start(self, timeout_s: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if self.config.grpc_port:  # fail before starting anything; the child's exit status covers a race
                try:
                    check_address(self.config.grpc_host, self.config.grpc_port)
                except AddressInUse as exc:
                    raise PlatformStartError(f"{exc}{_HINT}") from None
            if self.config.http and self.http_port:
                try:
                    check_address(self.config.http_host, self.http_port)
                except AddressInUse as exc:
                    raise PlatformStartError(f"{exc} (another TuneForge may be running there; choose another "
                                             "with --http-port or TUNEFORGE_HTTP_PORT)") from None
            if not self.nats_url:
                self.nats_auth = NatsAuth.load_or_create(self.data_dir / NATS_AUTH_DIR)
                self.nats = _Nats(self.data_dir / "nats", auth=self.nats_auth, pass_fds=self._inherited_fds(),
                                  parent_death_signal=PARENT_DEATH_SIGNAL, sync_always=True)
                try:
                    self.nats_url = self.nats.start()
                except RuntimeError as exc:
                    raise PlatformStartError(str(exc)) from exc
            ready = self._start_services()
            services = self.services
            assert services is not None
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                code = services.poll()
                if code == EXIT_ADDRESS_IN_USE:
                    raise PlatformStartError(self._taken(self.logs_dir / "services.log"))
                if code is not None:
                    raise PlatformStartError(f"the services process exited with {code}; "
                                             f"see {self.logs_dir / 'services.log'}")
                if time.monotonic() > deadline:
                    raise PlatformStartError("the services did not start in time; "
                                             f"see {self.logs_dir / 'services.log'}")
                time.sleep(0.05)
            self.address = ready.read_text().strip()
            self._services_serving = True
            gateway_ready = self._start_gateway() if self.config.http else None
            for _ in range(self.config.workers):
                self.start_worker()
            if gateway_ready is not None:
                self._wait_gateway(gateway_ready, deadline)
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def _start_services(self) -> Path:
        """Starts the services process; it writes its address to the returned file once it serves. A
        restart asks for the port it served on before, so the platform's address stays the same."""
        ready = self.data_dir / "services.address"
        ready.unlink(missing_ok=True)
        env = {"TUNEFORGE_READY_FILE": str(ready)}
        if self.address:
            env["TUNEFORGE_GRPC_PORT"] = self.address.rsplit(":", 1)[1]
        self.services = self._spawn(["-m", "services.platform"], "services.log", env,
                                    nats_user=SERVICES_USER)
        self._services_serving = False
        return ready

    @property
    def http_port(self) -> int:
        """The port the gateway is asked to listen on (its first port again after a restart)."""
        if self.http_url:
            return int(self.http_url.rsplit(":", 1)[1].rstrip("/"))
        if self.config.http_port is not None:
            return self.config.http_port
        return 0 if self.config.grpc_port == 0 else 8080

    def _start_gateway(self) -> Path:
        """Starts the HTTP gateway (a gRPC client of the services' address, holding no secret of theirs);
        it writes its URL to the returned file once it listens."""
        ready = self.data_dir / "gateway.address"
        ready.unlink(missing_ok=True)
        host = self.address.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        env = {"TUNEFORGE_READY_FILE": str(ready), "TUNEFORGE_HTTP_HOST": self.config.http_host,
               "TUNEFORGE_HTTP_PORT": str(self.http_port),
               "TUNEFORGE_GATEWAY_GRPC_TARGET": f"{host}:{self.address.rsplit(':', 1)[1]}"}
        self.gateway = self._spawn(["-m", "services.gateway"], "gateway.log", env,
                                   withhold=GATEWAY_WITHHELD)
        self._gateway_serving = False
        return ready

    def _taken(self, log: Path) -> str:
        """What to say of a services process that could not listen: the address its log names (the gRPC
        port, or another port it serves: its Prometheus endpoint, downloads, the model endpoint), with the
        setting that chooses it."""
        grpc_address = f"{self.config.grpc_host}:{self.config.grpc_port}"
        try:
            found = _TAKEN.findall(log.read_text(errors="replace")[-4096:])
        except OSError:
            found = []
        taken = found[-1] if found else grpc_address
        if taken == grpc_address:
            return f"address {taken} is already in use{_HINT}"
        env = {**os.environ, **self.config.env}
        port = taken.rsplit(":", 1)[-1]
        setting = next((name for name in _PORT_SETTINGS if env.get(name) == port), "")
        which = f"{setting}: choose another port, or leave it unset" if setting else \
            f"one of the services process' ports; see {log}"
        return f"address {taken} is already in use ({which})"

    def _wait_gateway(self, ready: Path, deadline: float) -> None:
        gateway = self.gateway
        assert gateway is not None
        while not ready.exists():
            code = gateway.poll()
            where = f"{self.config.http_host}:{self.http_port}"
            if code == EXIT_ADDRESS_IN_USE:
                raise PlatformStartError(f"address {where} is already in use (another TuneForge may be "
                                         "running there; choose another with --http-port or "
                                         "TUNEFORGE_HTTP_PORT)")
            if code is not None:
                raise PlatformStartError(f"the HTTP gateway exited with {code}; see "
                                         f"{self.logs_dir / 'gateway.log'}")
            if time.monotonic() > deadline:
                raise PlatformStartError(f"the HTTP gateway did not start in time; see "
                                         f"{self.logs_dir / 'gateway.log'}")
            time.sleep(0.05)
        self.http_url = ready.read_text().strip()
        self._gateway_serving = True

    def _supervise_gateway(self, now: float) -> list[str]:
        """Restarts a gateway that died, on the same port, after its delay."""
        assert self.gateway is not None
        restarts = self._gateway_restarts
        code = self.gateway.poll()
        if code is None:
            ready = self.data_dir / "gateway.address"
            if self._gateway_serving or not ready.exists():
                return []
            self.http_url, self._gateway_serving = ready.read_text().strip(), True
            self._write_state()
            return [f"HTTP gateway restarted (pid {self.gateway.pid}, {self.http_url}, restart "
                    f"{restarts.count})"]
        if restarts.due_at is None:
            delay = restarts.schedule(now, self.config.restart_delay_s)
            return [f"HTTP gateway (pid {self.gateway.pid}) exited with {_exit(code)}; restarting it in "
                    f"{delay:g} s"]
        if now < restarts.due_at:
            return []
        self._start_gateway()
        restarts.started(now)
        return []

    def _write_state(self) -> None:
        assert self.services is not None
        (self.data_dir / "platform.json").write_text(json.dumps({
            "address": self.address, "nats_url": self.nats_url,
            "nats_pid": self.nats.pid if self.nats else None,
            "services_pid": self.services.pid, "worker_pids": [w.pid for w in self.workers],
            "http_url": self.http_url, "gateway_pid": self.gateway.pid if self.gateway else None}))

    def _spawn_worker(self, index: int, worker_id: str) -> subprocess.Popen[bytes]:
        env = {"TUNEFORGE_WORKER_ID": worker_id} if worker_id else {}
        return self._spawn(["-m", "trainer_worker"], f"worker-{index}.log", env, nats_user=WORKER_USER,
                           withhold=WORKER_WITHHELD)

    def start_worker(self, worker_id: str = "") -> subprocess.Popen[bytes]:
        index = len(self.workers)
        worker = self._spawn_worker(index, worker_id)
        self.workers.append(worker)
        self._slots.append(_WorkerSlot(index, worker_id, _Restarts(self.config.restart_delay_s)))
        if self.services is not None and self.address:
            self._write_state()
        return worker

    def supervise(self) -> list[str]:
        """Restarts what died among the workers, the services process and the embedded nats-server (each
        when its delay is up); returns a line for each death and restart, also written to
        logs/platform.log."""
        lines: list[str] = []
        now = time.monotonic()
        if self.nats is not None:
            lines += self._supervise_nats(now)
        if self.services is not None:
            lines += self._supervise_services(now)
        if self.gateway is not None:
            lines += self._supervise_gateway(now)
        for slot in self._slots:
            worker = self.workers[slot.index]
            code = worker.poll()
            if code is None:
                continue
            name = f"worker {slot.index}" + (f" ({slot.worker_id})" if slot.worker_id else "")
            if slot.restarts.due_at is None:
                delay = slot.restarts.schedule(now, self.config.restart_delay_s)
                lines.append(f"{name} (pid {worker.pid}) exited with {_exit(code)}; restarting it in "
                             f"{delay:g} s")
            elif now >= slot.restarts.due_at:
                self.workers[slot.index] = self._spawn_worker(slot.index, slot.worker_id)
                slot.restarts.started(now)
                lines.append(f"{name} restarted (pid {self.workers[slot.index].pid}, restart "
                             f"{slot.restarts.count})")
                self._write_state()
        self._log(lines)
        return lines

    def _supervise_services(self, now: float) -> list[str]:
        assert self.services is not None
        if self._fatal:
            return []
        restarts = self._services_restarts
        code = self.services.poll()
        if code is None:
            ready = self.data_dir / "services.address"
            if self._services_serving or not ready.exists():
                return []
            self.address = ready.read_text().strip()
            self._services_serving, self._address_in_use = True, 0
            self._write_state()
            return [f"services restarted (pid {self.services.pid}, {self.address}, restart {restarts.count})"]
        if restarts.due_at is None:
            if code == EXIT_ADDRESS_IN_USE and not self._services_serving:
                self._address_in_use += 1
                if self._address_in_use >= MAX_ADDRESS_IN_USE:
                    self._fatal = (f"the services process cannot listen on {self.address} again: another "
                                   "process has taken that address")
                    return [f"services (pid {self.services.pid}) exited with {_exit(code)}: {self.address} "
                            "is taken by another process; not restarting it"]
            delay = restarts.schedule(now, self.config.restart_delay_s)
            return [f"services (pid {self.services.pid}) exited with {_exit(code)}; restarting it in "
                    f"{delay:g} s on {self.address}"]
        if now < restarts.due_at:
            return []
        self._start_services()
        restarts.started(now)
        return []

    def _supervise_nats(self, now: float) -> list[str]:
        assert self.nats is not None
        code = self.nats.exit_code()
        if code is None:
            return []
        restarts = self._nats_restarts
        if restarts.due_at is None:
            delay = restarts.schedule(now, self.config.restart_delay_s)
            return [f"nats-server (pid {self.nats.pid}) exited with {_exit(code)}; restarting it in "
                    f"{delay:g} s on the same port"]
        if now < restarts.due_at:
            return []
        # The same port and JetStream folder: clients reconnect to it, and the streams are as they were.
        self.nats.port = urlparse(self.nats_url).port or self.nats.port
        try:
            self.nats.start()
        except RuntimeError as exc:
            restarts.started(now)  # counts as a start that died at once: the next wait is longer
            delay = restarts.schedule(now, self.config.restart_delay_s)
            return [f"nats-server did not restart ({exc}); trying again in {delay:g} s"]
        restarts.started(now)
        if self.services is not None:
            self._write_state()
        return [f"nats-server restarted (pid {self.nats.pid}, {self.nats.url}, restart {restarts.count})"]

    def _log(self, lines: list[str]) -> None:
        if not lines:
            return
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(self.logs_dir / "platform.log", "a") as log:
            log.writelines(f"{stamp} {line}\n" for line in lines)

    def check_alive(self) -> str | None:
        """A sentence saying what went wrong that no restart mends (the platform should stop), or None.
        A child that died is not such a thing: `supervise` restarts it."""
        return self._fatal

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM everything (workers first, so they hand their jobs back), wait, then SIGKILL."""
        children = [w for w in self.workers if w.poll() is None]
        if self.gateway and self.gateway.poll() is None:
            children.append(self.gateway)
        if self.services and self.services.poll() is None:
            children.append(self.services)
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if self.nats:
            self.nats.stop()
            self.nats = None
        self._unlock()

    def __enter__(self) -> Platform:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _read_pid(fd: int) -> int:
    """The pid written in the lock file (0: none yet)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


def _orphans(lock_path: Path) -> tuple[str, str]:
    """What to say of a lock whose supervisor has exited: which of its processes still hold it, and what
    to do about them."""
    still = _lock_holders(lock_path)
    if not still:
        return ", which has exited while its processes still run", "wait for its processes to stop"
    named = ", ".join(f"pid {pid} ({what})" for pid, what in still)
    pids = " ".join(str(pid) for pid, _ in still)
    return (f", which has exited while its processes still run: {named}",
            f"wait for them to stop, or stop them (kill {pids})")


def _lock_holders(lock_path: Path) -> list[tuple[int, str]]:
    """The other processes that have the lock file open (Linux: /proc/<pid>/fd), with their command lines
    cut short; [] where that cannot be read."""
    try:
        target = os.stat(lock_path)
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    for proc in Path("/proc").glob("[0-9]*"):
        if proc.name == str(os.getpid()):  # this process opened it to ask for the lock
            continue
        try:
            for fd in (proc / "fd").iterdir():
                st = os.stat(fd)
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append((int(proc.name), " ".join(command.split())[:80] or "?"))
                    break
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (an unknown pid counts as alive: fail rather than wait)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit(code: int) -> str:
    """An exit status in words: "code 1", "signal SIGKILL"."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"code {code}"
