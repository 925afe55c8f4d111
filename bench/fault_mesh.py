"""The mesh under fault (``python -m mesh.launcher`` in a scratch directory), a client that
follows a turn to its end and resumes it wherever its stream breaks, and the judging of one run:
the pieces every fault of bench/faults.py shares."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc

from bench.common import ROOT, child_env
from mesh.auth import add_key_to_file
from mesh.settings import default_state_dir

TOKEN_INTERVAL_MS = 25
MAX_TOKENS = 120  # 3 s of paced tokens: the fault lands mid-turn
FAULT_AFTER_TOKENS = 15
RESTART_BUDGET = 100
# Downloads the scale profile needs (Kafka's jars, Elasticsearch's distribution), cached where
# `make up PROFILE=scale` caches them; a scratch mesh links them rather than fetching again.
CACHED_INFRA = ("kafka/kafka-*", "elasticsearch/elasticsearch-*")


@dataclass
class Outcome:
    """One run of one fault."""

    finished: bool = False
    lost: int = 0  # seqs in 1..last_seq the client never got
    duplicated: int = 0  # seqs the client got more than once
    persisted_differs: bool = False
    failed_calls: int = 0  # malformed: calls that hung, and processes that had to restart
    recovery_s: float | None = None
    note: str = ""


# -- the mesh under test ------------------------------------------------------------------------


class Launched:
    """``python -m mesh.launcher`` in a scratch directory; its mesh.json read on demand.

    ``profile`` is the launcher's (``scale``: Kafka, Elasticsearch, a PostgreSQL server, Envoy);
    ``env`` adds settings to the launcher's environment (which its services inherit);
    ``prepare`` runs on the empty state directory before the launcher starts (the disk-full
    fault mounts a small volume where the embedded log goes)."""

    def __init__(
        self,
        root: Path,
        model: Path,
        agents: int = 1,
        *,
        profile: str = "embedded",
        env: dict[str, str] | None = None,
        prepare: Callable[[Path], None] | None = None,
    ) -> None:
        self.root = root
        self.agents = agents
        self.profile = profile
        self.adopted: list[subprocess.Popen[bytes]] = []  # servers the suite restarted itself
        keys = root / "api-keys.json"
        self.key = add_key_to_file(keys, "faults", rate_per_s=1000.0, burst=1000)
        self.log = root / "launcher.log"
        state = root / "state"
        state.mkdir(parents=True, exist_ok=True)
        if profile == "scale":
            _link_cached_infra(state)
        if prepare is not None:
            prepare(state)
        command = [sys.executable, "-m", "mesh.launcher", "--state-dir", str(state)]
        command += ["--model", str(model), "--keys-file", str(keys), "--gateways", "2"]
        command += ["--agents", str(agents), "--profile", profile]
        # Issue 11's counts kill the same agent ten times in a few minutes: more than the
        # default budget (5 restarts in 10 minutes) allows, by design.
        command += ["--restart-budget", str(RESTART_BUDGET)]
        full_env = {
            **child_env(),
            "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS),
            # Clients here resume within seconds; the turn must not be given up meanwhile.
            "MESH_AGENT_ORPHAN_GRACE_S": "120",
            **(env or {}),
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=full_env,
            )  # fmt: skip
        try:
            self.info = self._wait_started(600 if profile == "scale" else 240)
        except BaseException:  # interrupted or failed: the launcher stops what it started
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(120)
            raise

    def _wait_started(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the launcher exited:\n{self.tail()}")
            info = self.read_info()
            if info is not None and info.get("pid") == self.process.pid:
                return info
            time.sleep(0.3)
        raise RuntimeError(f"the mesh did not start in {timeout_s:.0f} s:\n{self.tail()}")

    def read_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads((self.root / "state" / "mesh.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info

    def service(self, name: str) -> dict[str, Any]:
        info = self.read_info() or self.info
        return info["services"][name]  # type: ignore[no-any-return]

    def names(self) -> list[str]:
        """Every service of the mesh but Envoy (none runs here)."""
        return [*(f"agent-{i + 1}" for i in range(self.agents)), "gateway-1", "gateway-2",
                "persister", "memory"]  # fmt: skip

    def running_agent(self) -> str | None:
        """The agent generating right now (its engine has a request running), if any."""
        for i in range(self.agents):
            name = f"agent-{i + 1}"
            url = f"http://127.0.0.1:{self.service(name)['metrics_port']}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("mesh_engine_num_requests_running{") and float(
                    line.rsplit(" ", 1)[1]
                ):
                    return name
        return None

    def gateways(self) -> list[str]:
        return [self.service(name)["addr"] for name in ("gateway-1", "gateway-2")]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        for name in self.names():
            try:  # a stopped service would never drain
                os.kill(self.service(name)["pid"], signal.SIGCONT)
            except (KeyError, ProcessLookupError):
                pass
        for pid in self.infra_pids():  # a frozen server would never stop
            send_signal(pid, signal.SIGCONT)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in self.adopted:  # the launcher does not know them
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    def infra_pids(self, kind: str = "", *, children: bool = True) -> list[int]:
        """The server processes of this mesh (PostgreSQL, Kafka, Elasticsearch): those whose
        command line names the scratch directory and ``kind`` (``postgres``, ``kafka.Kafka``,
        ``elasticsearch``), with their children (PostgreSQL's backends) unless ``children`` is
        false. Found by command line: pg_ctl detaches PostgreSQL from the launcher."""
        own = {
            self.process.pid,
            *(s["pid"] for s in (self.read_info() or self.info)["services"].values()),
        }
        below = set(_descendants([self.process.pid]))
        servers = []
        for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()):
            argv = cmdline(pid)
            ours = pid in below or any(str(self.root) in part for part in argv)
            if ours and pid not in own and any(kind in part for part in argv):
                servers.append(pid)
        # Only the topmost of each server (PostgreSQL's backends also say "postgres").
        tops = [p for p in servers if not set(_ancestors(p)) & set(servers)]
        return tops + (_descendants(tops) if children else [])


def _stub(addr: str) -> tuple[grpc.Channel, gateway_service_pb2_grpc.GatewayServiceStub]:
    channel = grpc.insecure_channel(addr)
    return channel, gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]


# -- a client that resumes ---------------------------------------------------------------------


@dataclass
class Followed:
    turn_id: str = ""
    conversation_id: str = ""
    seqs: list[int] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    finished: gateway_pb2.TurnFinished | None = None
    finished_at: float = 0.0
    token_times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the statuses broken calls ended with
    error_messages: set[str] = field(default_factory=set)  # "STATUS: message", each once
    started_at: float = field(default_factory=time.monotonic)

    def take(self, frame: Any) -> None:
        kind = frame.WhichOneof("frame")
        now = time.monotonic()
        if kind == "accepted":
            self.turn_id = frame.accepted.turn_id
            self.conversation_id = frame.accepted.conversation_id
        elif kind == "token":
            self._token(frame.token.seq, frame.token.text, now)
        elif kind == "token_run":
            for i, text in enumerate(frame.token_run.texts):
                self._token(frame.token_run.first_seq + i, text, now)
        elif kind == "finished":
            self.finished = frame.finished
            self.finished_at = now

    def _token(self, seq: int, text: str, at: float) -> None:
        self.seqs.append(seq)
        self.texts.setdefault(seq, text)
        self.token_times.append(at)

    def stall_after(self, at: float) -> float | None:
        """The longest pause in the client's tokens from ``at`` (a fault) on: the time the
        fault cost. Not the first token after ``at``: tokens already on their way when the
        fault struck still arrive first, and on a busy machine the client reads them late."""
        times = [at, *(t for t in self.token_times if t > at)]
        if len(times) < 2:
            return None
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    @property
    def last_seq(self) -> int:
        return max(self.seqs, default=0)

    @property
    def text(self) -> str:
        return "".join(self.texts[s] for s in sorted(self.texts))


def follow_turn(
    mesh: Launched,
    text: str,
    on_token: Callable[[Followed], None] | None = None,
    *,
    deadline_s: float = 90.0,
) -> Followed:
    """Start a turn on gateway-1 and follow it to its end, resuming wherever a stream breaks."""
    followed = Followed()
    auth = (("x-api-key", mesh.key),)
    start = gateway_pb2.StartTurn(
        text=text,
        # A retried start (after a refusal or a broken stream) must not start a second turn.
        request_id=str(uuid.uuid4()),
        options=common_pb2.GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0),
    )
    deadline = time.monotonic() + deadline_s
    attempt = 0
    while followed.finished is None and time.monotonic() < deadline:
        addr = mesh.gateways()[attempt % 2]
        attempt += 1
        channel, stub = _stub(addr)
        try:
            if not followed.turn_id:
                frames = stub.StreamTurn(
                    gateway_pb2.StreamTurnRequest(start=start), metadata=auth, timeout=60
                )
            else:
                frames = stub.ResumeTurn(
                    gateway_pb2.ResumeTurnRequest(
                        turn_id=followed.turn_id, after_seq=followed.last_seq
                    ),
                    metadata=auth,
                    timeout=60,
                )
            for frame in frames:
                followed.take(frame)
                if on_token is not None and frame.WhichOneof("frame") in ("token", "token_run"):
                    on_token(followed)
        except grpc.RpcError as error:
            followed.errors.append(error.code().name)
            followed.error_messages.add(f"{error.code().name}: {error.details()}")
            time.sleep(0.2)  # a broken stream: resume on the other gateway
        finally:
            channel.close()
    return followed


def persisted_text(mesh: Launched, conversation_id: str, timeout_s: float = 60.0) -> str | None:
    """The assistant message PostgreSQL holds for the conversation, once it is there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for addr in mesh.gateways():
            channel, stub = _stub(addr)
            try:
                got = stub.GetConversation(
                    gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
                    metadata=(("x-api-key", mesh.key),),
                    timeout=10,
                ).conversation
                if len(got.messages) >= 2:
                    return str(got.messages[-1].text)
            except grpc.RpcError:
                pass
            finally:
                channel.close()
        time.sleep(0.5)
    return None


def count_tokens(followed: Followed, outcome: Outcome) -> Outcome:
    """Whether the turn ended, and the seqs the client lost or got twice, into ``outcome``."""
    outcome.finished = followed.finished is not None
    last = followed.finished.last_seq if followed.finished is not None else followed.last_seq
    got = set(followed.seqs)
    outcome.lost = sum(1 for seq in range(1, last + 1) if seq not in got)
    outcome.duplicated = len(followed.seqs) - len(got)
    return outcome


def judge(mesh: Launched, followed: Followed, outcome: Outcome) -> Outcome:
    """count_tokens, and whether PostgreSQL holds exactly the text the client saw."""
    count_tokens(followed, outcome)
    if outcome.finished:
        outcome.persisted_differs = persisted_text(mesh, followed.conversation_id) != followed.text
    return outcome


def send_signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        found.append(pid)
    return found


def _descendants(roots: list[int]) -> list[int]:
    """Every process below ``roots`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _link_cached_infra(state: Path) -> None:
    """Link the Kafka jars and the Elasticsearch distribution that `make up PROFILE=scale`
    fetched into a scratch state directory, where the launcher looks for them first."""
    cache = default_state_dir(os.environ) / "infra"
    for pattern in CACHED_INFRA:
        for source in cache.glob(pattern):
            target = state / "infra" / source.relative_to(cache)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source.resolve())
