"""The fault suite: ``make faults`` (``python -m bench.faults``). Bounded in time; not part of
``make test``, except the smoke subset in tests/integration/test_faults_smoke.py.

Each fault is injected into a mesh started the way users start it (``python -m mesh.launcher``,
embedded profile, two gateways, the tiny test model with paced tokens), while a client streams a
turn. The client behaves as a real one would: when its stream breaks it resumes the turn, on any
gateway that answers, after the last token it has. Per fault and run the suite checks that the
turn ended, that the tokens the client got are exactly 1..last_seq (none lost, none twice), and
that PostgreSQL holds exactly the text the client saw; and it times the recovery.

Faults (``--only NAME``): ``agent-kill`` (SIGKILL of the agent generating the turn; the launcher
restarts it, or the other agent takes over), ``agent-zombie`` (that agent SIGSTOPped past the
log's session timeout, then woken: the other agent takes over; needs ``--agents 2``, the
default), ``persister-kill`` (SIGKILL mid-turn), ``gateway-kill`` (SIGKILL of the client's gateway;
the client resumes on the other), ``memory-stop`` (memory SIGSTOPped for ``--outage-s``; turns
go on without recall), ``malformed`` (random bytes and random field values sent to every
gateway RPC: each gets a status, nothing crashes).

``--write`` replaces the table in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc

from bench.common import ROOT, child_env, machine, p50_p99
from mesh.auth import add_key_to_file
from mesh.launcher import wait_healthy
from mesh.llm.tiny_model import ensure_tiny_model
from mesh.tls import channel_credentials, load_identity

FAULTS = (
    "agent-kill",
    "agent-zombie",
    "persister-kill",
    "gateway-kill",
    "memory-stop",
    "malformed",
)
RELIABILITY_DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
TOKEN_INTERVAL_MS = 25
MAX_TOKENS = 120  # 3 s of paced tokens: the fault lands mid-turn
FAULT_AFTER_TOKENS = 15
# Past the embedded log's session timeout (3 s): the other agent owns the turn by then.
ZOMBIE_PAUSE_S = 8.0


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


@dataclass
class FaultResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        recoveries = [o.recovery_s for o in self.outcomes if o.recovery_s is not None]
        p50, p99 = p50_p99(recoveries) if recoveries else (float("nan"), float("nan"))
        return {
            "fault": self.name,
            "runs": len(self.outcomes),
            "turns_lost": sum(not o.finished for o in self.outcomes),
            "tokens_lost": sum(o.lost for o in self.outcomes),
            "tokens_duplicated": sum(o.duplicated for o in self.outcomes),
            "persisted_differs": sum(o.persisted_differs for o in self.outcomes),
            "failed_calls": sum(o.failed_calls for o in self.outcomes),
            "recovery_p50_s": round(p50, 2),
            "recovery_p99_s": round(p99, 2),
            "notes": sorted({o.note for o in self.outcomes if o.note}),
        }


# -- the mesh under test ------------------------------------------------------------------------


class Launched:
    """``python -m mesh.launcher`` in a scratch directory; its mesh.json read on demand."""

    def __init__(self, root: Path, model: Path, agents: int = 1) -> None:
        self.root = root
        self.agents = agents
        keys = root / "api-keys.json"
        self.key = add_key_to_file(keys, "faults", rate_per_s=1000.0, burst=1000)
        self.log = root / "launcher.log"
        command = [sys.executable, "-m", "mesh.launcher", "--state-dir", str(root / "state")]
        command += ["--model", str(model), "--keys-file", str(keys), "--gateways", "2"]
        command += ["--agents", str(agents)]
        env = {
            **child_env(),
            "MESH_AGENT_MIN_TOKEN_INTERVAL_MS": str(TOKEN_INTERVAL_MS),
            # Clients here resume within seconds; the turn must not be given up meanwhile.
            "MESH_AGENT_ORPHAN_GRACE_S": "120",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=env,
            )  # fmt: skip
        self.info = self._wait_started(240)

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
        for name in ("agent-1", "memory", "persister"):
            try:  # a stopped service would never drain
                os.kill(self.service(name)["pid"], signal.SIGCONT)
            except (KeyError, ProcessLookupError):
                pass
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


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
        text=text, options=common_pb2.GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0)
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
        except grpc.RpcError:
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


def judge(mesh: Launched, followed: Followed, outcome: Outcome) -> Outcome:
    outcome.finished = followed.finished is not None
    last = followed.finished.last_seq if followed.finished is not None else followed.last_seq
    got = set(followed.seqs)
    outcome.lost = sum(1 for seq in range(1, last + 1) if seq not in got)
    outcome.duplicated = len(followed.seqs) - len(got)
    if outcome.finished:
        outcome.persisted_differs = persisted_text(mesh, followed.conversation_id) != followed.text
    return outcome


# -- the faults --------------------------------------------------------------------------------


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_during_turn(mesh: Launched, name: str) -> Outcome:
    """SIGKILL ``name`` (``agent``: the agent generating the turn) once the turn has
    FAULT_AFTER_TOKENS tokens; recovery: kill to the next token the client gets."""
    outcome = Outcome()
    killed_at: list[float] = []

    def on_token(followed: Followed) -> None:
        if not killed_at and len(followed.seqs) >= FAULT_AFTER_TOKENS:
            target = mesh.running_agent() if name == "agent" else name
            if target is None:
                return  # not generating at this instant: try at the next token
            killed_at.append(time.monotonic())
            _signal(mesh.service(target)["pid"], signal.SIGKILL)

    followed = follow_turn(mesh, f"fault {name} {random.random()}", on_token)
    if killed_at:
        after = [t for t in followed.token_times if t > killed_at[0]]
        outcome.recovery_s = after[0] - killed_at[0] if after else None
    else:
        outcome.note = "the turn ended before the fault"
    return judge(mesh, followed, outcome)


def zombie_agent(mesh: Launched, pause_s: float) -> Outcome:
    """SIGSTOP the agent generating the turn for ``pause_s``, past the log's session timeout: the
    other agent takes the turn over, and the stopped one, woken, must not write into it (its
    appends are fenced; readers would drop a copy anyway, docs/reliability.md). Recovery: stop
    to the next token the client gets."""
    outcome = Outcome()
    stopped: list[tuple[float, int]] = []

    def on_token(followed: Followed) -> None:
        if not stopped and len(followed.seqs) >= FAULT_AFTER_TOKENS:
            target = mesh.running_agent()
            if target is None:
                return
            pid = mesh.service(target)["pid"]
            stopped.append((time.monotonic(), pid))
            _signal(pid, signal.SIGSTOP)
            threading.Timer(pause_s, _signal, (pid, signal.SIGCONT)).start()

    followed = follow_turn(mesh, f"fault zombie {random.random()}", on_token)
    if stopped:
        after = [t for t in followed.token_times if t > stopped[0][0]]
        outcome.recovery_s = after[0] - stopped[0][0] if after else None
        time.sleep(max(0.0, stopped[0][0] + pause_s + 1.0 - time.monotonic()))  # awake again
    else:
        outcome.note = "the turn ended before the fault"
    return judge(mesh, followed, outcome)


def kill_persister(mesh: Launched) -> Outcome:
    """SIGKILL the persister mid-turn; recovery: from the turn's end (as the client saw it) until
    the turn is in PostgreSQL, the delay the kill added to persistence."""
    outcome = Outcome()
    killed_at: list[float] = []

    def on_token(followed: Followed) -> None:
        if not killed_at and len(followed.seqs) >= FAULT_AFTER_TOKENS:
            killed_at.append(time.monotonic())
            _signal(mesh.service("persister")["pid"], signal.SIGKILL)

    followed = follow_turn(mesh, f"fault persister {random.random()}", on_token)
    judge(mesh, followed, outcome)  # waits until PostgreSQL holds the turn
    if killed_at and outcome.finished and not outcome.persisted_differs:
        outcome.recovery_s = time.monotonic() - followed.finished_at
    elif not killed_at:
        outcome.note = "the turn ended before the fault"
    return outcome


def stop_memory(mesh: Launched, outage_s: float) -> Outcome:
    """SIGSTOP memory for ``outage_s`` while turns run; recovery: SIGCONT until a turn's recall
    is no longer skipped."""
    outcome = Outcome()
    pid = mesh.service("memory")["pid"]
    _signal(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        followed = follow_turn(mesh, f"fault memory {random.random()}")
        judge(mesh, followed, outcome)
        skipped = followed.finished is not None and any(
            s.source == "recall" for s in followed.finished.context_skipped
        )
        if not skipped:
            outcome.note = "recall was not reported skipped during the outage"
        time.sleep(max(0.0, outage_s - (time.monotonic() - stopped)))
    finally:
        _signal(pid, signal.SIGCONT)
    resumed = time.monotonic()
    while time.monotonic() - resumed < 120:
        probe = follow_turn(mesh, f"after the outage {random.random()}")
        if probe.finished is not None and not any(
            s.source == "recall" for s in probe.finished.context_skipped
        ):
            outcome.recovery_s = time.monotonic() - resumed
            break
    return outcome


def malformed(mesh: Launched, frames: int) -> Outcome:
    """Random bytes and random field values at every gateway RPC: each call must end with a
    status (no hang), and no service may exit (the launcher would restart it)."""
    outcome = Outcome(finished=True)
    rng = random.Random(7)
    pids = {name: mesh.service(name)["pid"] for name in mesh.names()}
    methods = [
        ("/chat.gateway.v1.GatewayService/StreamTurn", "unary_stream"),
        ("/chat.gateway.v1.GatewayService/ResumeTurn", "unary_stream"),
        ("/chat.gateway.v1.GatewayService/CancelTurn", "unary_unary"),
        ("/chat.gateway.v1.GatewayService/GetConversation", "unary_unary"),
        ("/chat.gateway.v1.GatewayService/ListConversations", "unary_unary"),
    ]
    hung = 0
    for i in range(frames):
        addr = mesh.gateways()[i % 2]
        method, kind = methods[i % len(methods)]
        payload = _garbage(rng)
        with grpc.insecure_channel(addr) as channel:
            call = getattr(channel, kind)(method)
            try:
                result = call(payload, metadata=(("x-api-key", mesh.key),), timeout=10)
                if kind == "unary_stream":
                    for _ in result:
                        pass
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    hung += 1
    restarted = [n for n, pid in pids.items() if mesh.service(n)["pid"] != pid]
    outcome.note = f"{frames} frames, {hung} hung, restarted: {restarted or 'none'}"
    outcome.failed_calls = hung + len(restarted)
    return outcome


def _garbage(rng: random.Random) -> bytes:
    """Random bytes, or a well-formed message whose fields hold hostile values."""
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(0, 512))
    hostile = rng.choice(
        ["", "\x00\x01\x02", "x" * 70_000, "<start_of_turn>model\n", "ä" * 1000, "🙂" * 300,
         "../../etc/passwd", "-1", " " * 50]
    )  # fmt: skip
    start = gateway_pb2.StartTurn(
        conversation_id=rng.choice(["", hostile, "00000000-0000-0000-0000-000000000000"]),
        text=hostile,
        request_id=rng.choice(["", hostile]),
        options=common_pb2.GenerationOptions(
            max_tokens=rng.choice([0, -5, 1, 2**31 - 1]),
            temperature=rng.choice([0.0, -1.0, float("nan"), 1e30]),
            top_p=rng.choice([0.0, 1.5, -0.1]),
        ),
    )
    messages: list[Any] = [
        gateway_pb2.StreamTurnRequest(start=start),
        gateway_pb2.ResumeTurnRequest(turn_id=hostile, after_seq=rng.choice([-1, 0, 2**62])),
        gateway_pb2.CancelTurnRequest(turn_id=hostile),
        gateway_pb2.GetConversationRequest(conversation_id=hostile),
    ]
    return bytes(rng.choice(messages).SerializeToString())


# -- running and reporting ---------------------------------------------------------------------


def run(
    only: Sequence[str], runs: int, outage_s: float, frames: int, agents: int = 2
) -> dict[str, Any]:
    model = ensure_tiny_model(ROOT / ".state" / "models")
    root = Path(tempfile.mkdtemp(prefix="mesh-faults-"))
    root.chmod(0o755)
    results: list[FaultResult] = []
    started = time.monotonic()
    with _mesh(root, model, agents) as mesh:
        follow_turn(mesh, "warm up")  # the model loaded, the first turn's costs paid
        for name in only:
            result = FaultResult(name)
            for i in range(1 if name == "malformed" else runs):
                print(f"faults: {name} run {i + 1}", file=sys.stderr, flush=True)
                if name == "agent-kill":
                    result.outcomes.append(kill_during_turn(mesh, "agent"))
                elif name == "agent-zombie":
                    if agents < 2:
                        result.outcomes.append(Outcome(finished=True, note="needs --agents 2"))
                        break
                    result.outcomes.append(zombie_agent(mesh, ZOMBIE_PAUSE_S))
                elif name == "gateway-kill":
                    result.outcomes.append(kill_during_turn(mesh, "gateway-1"))
                elif name == "persister-kill":
                    result.outcomes.append(kill_persister(mesh))
                elif name == "memory-stop":
                    result.outcomes.append(stop_memory(mesh, outage_s))
                else:
                    result.outcomes.append(malformed(mesh, frames))
                _wait_restarted(mesh)
            results.append(result)
    return {
        "machine": machine(),
        "load_average": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1),
        "agents": agents,
        "rows": [r.row() for r in results],
    }


@contextmanager
def _mesh(root: Path, model: Path, agents: int) -> Iterator[Launched]:
    mesh = Launched(root, model, agents)
    try:
        yield mesh
    finally:
        mesh.stop()


def _wait_restarted(mesh: Launched, timeout_s: float = 60.0) -> None:
    """Until every service answers health again (the launcher restarts what was killed); the
    internal services over mutual TLS, as the launcher's operator identity."""
    tls = (mesh.read_info() or mesh.info).get("tls") or {}
    credentials = None
    if tls.get("MESH_TLS_CA"):
        credentials = channel_credentials(
            load_identity(
                Path(tls["MESH_TLS_CA"]), Path(tls["MESH_TLS_CERT"]), Path(tls["MESH_TLS_KEY"])
            )
        )
    for name in mesh.names():
        internal = not name.startswith("gateway")
        wait_healthy(
            mesh.service(name)["addr"],
            timeout_s=timeout_s,
            name=name,
            credentials=credentials if internal else None,
            server_name=name.split("-")[0] if internal else "",
        )


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    lines = [
        f"Measured on {m['cpu_model']} ({m['cpus']} CPUs, {m['memory_gib']} GiB), load {load}, "
        f"in {report['seconds']} s; embedded profile through the launcher, two gateways, "
        f"{report.get('agents', 1)} agent(s), tiny model paced at {TOKEN_INTERVAL_MS} ms/token, "
        f"{MAX_TOKENS}-token turns.",
        "",
        "| fault | runs | turns lost | tokens lost | tokens duplicated | persisted ≠ streamed "
        "| hung calls, restarts | recovery p50 | recovery p99 | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['fault']} | {row['runs']} | {row['turns_lost']} | {row['tokens_lost']} "
            f"| {row['tokens_duplicated']} | {row['persisted_differs']} | {row['failed_calls']} "
            f"| {row['recovery_p50_s']} s | {row['recovery_p99_s']} s "
            f"| {'; '.join(row['notes'])} |"
        )
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = RELIABILITY_DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    RELIABILITY_DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--only", action="append", choices=FAULTS, help="repeatable")
    parser.add_argument("--runs", type=int, default=10, help="runs per fault (malformed: 1)")
    parser.add_argument("--outage-s", type=float, default=10.0, help="memory-stop outage")
    parser.add_argument("--frames", type=int, default=2000, help="malformed frames")
    parser.add_argument("--agents", type=int, default=2, help="agents (agent-zombie needs 2)")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--write", action="store_true", help=f"update {RELIABILITY_DOC.name}")
    args = parser.parse_args(argv)
    report = run(args.only or list(FAULTS), args.runs, args.outage_s, args.frames, args.agents)
    text = table(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write:
        write_doc(text)
    bad = [
        r for r in report["rows"]
        if r["turns_lost"] or r["tokens_lost"] or r["tokens_duplicated"] or r["persisted_differs"]
        or r["failed_calls"]
    ]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
