"""What every row family shares: results, statistics, progress, the run's scratch space and
its one PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from mesh.infra.process import free_port as free_port  # re-exported for the rows
from mesh.pg import EmbeddedPostgres
from mesh.settings import default_state_dir

ROOT = Path(__file__).resolve().parent.parent

PASS = "PASS"
MISS = "MISS"
NOT_APPLICABLE = "n/a"


@dataclass
class Row:
    """One line of the table: a subject measured side by side with its baseline.

    ``metrics`` holds every number (milliseconds, tokens/s, ratios) for the JSON; the string
    fields are what the table shows.
    """

    row: str
    variant: str
    baseline: str
    subject: str
    comparison: str
    target: str
    verdict: str
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdict(ok: bool) -> str:
    return PASS if ok else MISS


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def p50_p99(values: Sequence[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 99)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


class Progress:
    """Progress lines on stderr, stamped with the seconds since the run began."""

    def __init__(self, quiet: bool = False) -> None:
        self._started = time.monotonic()
        self._quiet = quiet

    def __call__(self, message: str) -> None:
        if not self._quiet:
            elapsed = time.monotonic() - self._started
            print(f"[bench {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def project_state_dir() -> Path:
    """The project's state dir (``MESH_STATE_DIR``, else ``.state`` at the root), where the
    Kafka jars and the Elasticsearch distribution are cached across runs, like the tests'."""
    return default_state_dir({"MESH_STATE_DIR": str(ROOT / ".state"), **os.environ})


def child_env() -> dict[str, str]:
    """Environment for the processes a row starts: the project importable, output unbuffered."""
    pythonpath = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "gen" / "python"), os.environ.get("PYTHONPATH")) if p
    )
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
        "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp"),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10)
        for line in lscpu.stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    memory_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    llama_version = ""
    try:
        import llama_cpp

        llama_version = str(llama_cpp.__version__)
    except ImportError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(memory_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_version,
    }


class ChildProcess:
    """A process a row starts, optionally spoken to in JSON lines over stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls, name: str, args: Sequence[str], env: dict[str, str], log: Path, *, pipes: bool
    ) -> ChildProcess:
        with log.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                *args,
                env=env,
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipes else sink,
                stderr=sink,
                limit=64 * 1024 * 1024,  # answers carry every latency sample
            )
        return cls(process, name)

    async def write_line(self, line: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        await self.process.stdin.drain()

    async def request(self, message: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
        """Send ``message`` (if any) as a JSON line and return the next JSON line it answers."""
        assert self.process.stdout is not None
        if message is not None:
            await self.write_line((json.dumps(message) + "\n").encode())
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        if not line:
            await self.process.wait()
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class Context:
    """Scratch space for one run and the PostgreSQL server rows share (started on first use).

    Each row that needs PostgreSQL gets a fresh database on the one server, so rows never see
    each other's data and the run pays for one server start.
    """

    def __init__(self, *, quick: bool, progress: Progress, keep: bool = False) -> None:
        self.quick = quick
        self.progress = progress
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
        # pgserver drops to its own user when run as root; that user must reach its data dir.
        self.root.chmod(0o755)
        self._pg: EmbeddedPostgres | None = None
        self._pg_dsn = ""
        self._databases = 0
        self._kafka: Any = None

    def path(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        return path

    def database(self, prefix: str) -> str:
        """DSN of a new, empty database on the run's PostgreSQL server."""
        if self._pg is None:
            self.progress("starting PostgreSQL (pgserver)")
            self._pg = EmbeddedPostgres(self.root / "pg")
            self._pg_dsn = self._pg.start()
        self._databases += 1
        name = f"bench_{prefix}_{self._databases}"
        with psycopg.connect(self._pg_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        if "/postgres?" not in self._pg_dsn:
            raise RuntimeError(f"unexpected pgserver DSN shape: {self._pg_dsn}")
        return self._pg_dsn.replace("/postgres?", f"/{name}?", 1)

    async def kafka_bootstrap(self) -> str:
        """Bootstrap address of the run's Kafka broker (started on first use)."""
        if self._kafka is None:
            from mesh.infra.kafka import KafkaServer, default_jars_dir

            self.progress("starting Kafka")
            server = KafkaServer(
                self.path("kafka"),
                jars_dir=default_jars_dir(project_state_dir()),
                data_dir=self.path("kafka"),
            )
            bootstrap = await asyncio.to_thread(server.start)
            self._kafka = server
            return bootstrap
        return str(self._kafka.bootstrap)

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.stop()
            self._kafka = None
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def require_normal_finish(finished: Any) -> Any:
    """The ``TurnFinished`` frame of a mesh turn the benchmark times; RuntimeError unless the
    turn ended by stopping or by its length (an error or a cancel is no measurement)."""
    from chat.common.v1 import common_pb2

    normal = (
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP_SEQUENCE,
    )
    if finished is None or finished.finish_reason not in normal:
        raise RuntimeError(f"the mesh turn did not finish normally: {finished}")
    return finished
