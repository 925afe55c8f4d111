"""Running a server process the way every launcher here does: spawn, wait until ready, stop.

Kafka, Elasticsearch, the standalone PostgreSQL, Envoy and the mesh's own services all run the
same way: in a session of their own (a Ctrl-C in our terminal reaches us, and we stop them in
order), output appended to a log file, polled until ready while watching for an early exit, and
stopped with a signal to their whole process group (the Elasticsearch launcher JVM forks the
server JVM), then SIGKILL if they outlast a timeout. A start that fails stops what it started and
raises with the log's head and tail, where the cause usually is.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


class StartStop:
    """``with server as address:`` for launchers whose ``start()`` returns where they listen."""

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    _server: ServerProcess | None = None

    def _stop_process(self) -> None:
        """Stop the server's process (the signal it shuts down on, SIGKILL when it takes too
        long), if one runs."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account a server runs as when we are root."""

    name: str
    uid: int
    gid: int


def ensure_user(name: str, *, refusal: str, error: type[Exception] = RuntimeError) -> RunAs:
    """The system user ``name``, created (its own group, no home, no login) if missing.

    ``refusal`` says why the account is needed (``"PostgreSQL refuses to run as root"``); it
    opens the ``error`` raised when the account can be neither found nor created.
    """
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(name)
        return RunAs(name, entry.pw_uid, entry.pw_gid)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise error(
            f"{refusal} and there is no user {name!r} (nor useradd to create it): create it, "
            "or run as a non-root user"
        )
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home"]
        + ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode not in (0, 9):  # 9: another process created it meanwhile
        raise error(f"useradd {name} failed: {result.stderr.strip()}")
    entry = pwd.getpwnam(name)
    return RunAs(name, entry.pw_uid, entry.pw_gid)


def user_can(run_as: RunAs, *, read: Sequence[Path] = (), write: Sequence[Path] = ()) -> bool:
    """Whether ``run_as`` can read every path of ``read`` and write every path of ``write``.

    Asked of a shell running as that account, so that every parent directory's permissions
    count exactly as they will for the server.
    """
    paths = [*read, *write]
    script = " && ".join(
        f'test -{"r" if index < len(read) else "w"} "${index + 1}"' for index in range(len(paths))
    )
    probe = subprocess.run(
        ["/bin/sh", "-c", script or "true", "probe", *map(str, paths)],
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=[],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return probe.returncode == 0


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: RunAs | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log_path``, no stdin."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
            user=None if user is None else user.uid,
            group=None if user is None else user.gid,
            extra_groups=None if user is None else [],
        )


def wait_until(
    check: Callable[[], str | None],
    *,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    poll_s: float = 0.2,
) -> str | None:
    """Poll ``check`` (None once ready, else why not yet) while ``process`` runs.

    Returns None once ready, else why the wait gave up: the process exited, or ``timeout_s``
    passed (with the check's last answer).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            return f"exited with code {process.returncode}"
        why = check()
        if why is None:
            return None
        if time.monotonic() > deadline:
            return f"not ready after {timeout_s:.0f} s: {why}"
        time.sleep(poll_s)


def log_tail(path: Path, *, lines: int = 40, head: int = 0, start: int = 0) -> str:
    """The last ``lines`` lines of ``path``, after its first ``head`` ones when it is longer.

    ``start``: the byte offset where the part of interest begins (this run's, in a log that
    earlier runs appended to); ignored if the file is shorter (it was truncated meanwhile).
    """
    try:
        data = path.read_bytes()
    except OSError:
        return f"(nothing in {path})"
    text = data[start if start <= len(data) else 0 :].decode(errors="replace").splitlines()
    if len(text) <= head + lines:
        return "\n".join(text)
    return "\n".join([*text[:head], "[...]", *text[-lines:]])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # Gone already, or (not being root) a stranger's group that reused the id: nothing to do.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and not ours to signal
    return True


class ServerProcess:
    """One server process: ``spawn`` it, ``wait_ready``, ``stop``; errors quote its log.

    Args:
        what: the server's name in messages (``"Kafka"``).
        log_path: where its stdout and stderr are appended.
        error: the exception raised when it does not start.
        other_logs: logs the server writes itself, quoted after ``log_path`` in errors.
        stop_signal: the signal asking for a clean shutdown (PostgreSQL: SIGINT, "fast").
        stop_timeout_s: how long ``stop`` waits for the whole group before SIGKILL.
    """

    def __init__(
        self,
        what: str,
        log_path: Path,
        *,
        error: type[Exception] = RuntimeError,
        other_logs: Sequence[Path] = (),
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.what = what
        self.log_path = log_path
        self.error = error
        self.other_logs = tuple(other_logs)
        self.stop_signal = stop_signal
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log_starts: dict[Path, int] = {}

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: RunAs | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the server (see ``spawn``); ``user`` is the account to run it as, if not us."""
        if self.process is not None:
            raise RuntimeError(f"{self.what} is already running (pid {self.process.pid})")
        # Logs outlive runs: quote only what this one wrote.
        self._log_starts = {
            path: path.stat().st_size if path.exists() else 0
            for path in (self.log_path, *self.other_logs)
        }
        self.process = spawn(argv, log_path=self.log_path, env=env, cwd=cwd, user=user)
        return self.process

    def wait_ready(
        self, check: Callable[[], str | None], *, timeout_s: float, poll_s: float = 0.2
    ) -> None:
        """Poll ``check`` (None once ready, else why not yet) until it is ready.

        If the server exits first, or is not ready within ``timeout_s``, stops it and raises
        ``error`` with the tail of its logs; an interruption (Ctrl-C) stops it too.
        """
        if self.process is None:
            raise RuntimeError(f"{self.what} was not spawned")
        try:
            failure = wait_until(check, timeout_s=timeout_s, process=self.process, poll_s=poll_s)
        except BaseException:
            self.stop()
            raise
        if failure is not None:
            self.stop()  # first: what it forked may still be writing to the log
            raise self.error(f"{self.what} did not start ({failure}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 40, head: int = 15) -> str:
        """Head and tail of what the last spawn wrote to each log.

        The head too: a JVM's first stack trace line is often the cause.
        """
        tails = {
            path: log_tail(path, lines=lines, head=head, start=self._log_starts.get(path, 0))
            for path in (self.log_path, *self.other_logs)
        }
        if len(tails) == 1:
            return tails[self.log_path]
        return "\n".join(f"==> {path} <==\n{tail}" for path, tail in tails.items())

    def stop(self, timeout_s: float | None = None) -> None:
        """``stop_signal`` to the process group; SIGKILL to it if any of it outlasts the timeout.

        Harmless when it never started or is stopped already.
        """
        process, self.process = self.process, None
        if process is None:
            return
        pgid = process.pid  # start_new_session: it leads its own group
        _signal_group(pgid, self.stop_signal)
        deadline = time.monotonic() + (self.stop_timeout_s if timeout_s is None else timeout_s)
        # The whole group: a child (the server JVM behind Elasticsearch's launcher JVM) may
        # outlive the leader by a moment.
        while process.poll() is None or _group_alive(pgid):
            if time.monotonic() > deadline:
                _signal_group(pgid, signal.SIGKILL)
                break
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)


def block_until_signalled() -> None:
    """Sleep until SIGINT or SIGTERM: how the ``run`` commands keep their server up.

    Once woken, both signals are ignored, so that a second one cannot cut the server's stop short.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def serve_until_signalled(server: StartStop, variable: str) -> None:
    """Start ``server``, print ``variable=<address>`` for a shell to read, stop on a signal."""
    with server as address:
        print(f"{variable}={address}", flush=True)
        block_until_signalled()


def run_command(command: Callable[[], object], error: type[Exception]) -> int:
    """A launcher command's exit status: 0, or 1 with ``error``'s message on stderr."""
    try:
        command()
    except error as failure:
        print(failure, file=sys.stderr)
        return 1
    return 0
