"""The fault suite: ``make faults`` (``python -m bench.faults``). Bounded in time; not part of
``make test``, except the smoke subset in tests/integration/test_faults_smoke.py.

Each fault is injected into a mesh started the way users start it (``python -m mesh.launcher``
with two gateways and two agents, the tiny test model with paced tokens), while clients stream
turns. A client behaves as a real one would: a refused start is retried with the same request
id, and a broken stream is resumed, on any gateway that answers, after the last token it has. Per
run the suite checks that every accepted turn ended, that the tokens the client got are exactly
1..last_seq (none lost, none twice), and that PostgreSQL holds exactly the text the client saw;
and it times the recovery.

Faults (``--only NAME``, repeatable; runs per fault as issue 11 asks unless ``--runs``):

On the embedded profile: ``agent-kill`` ×20 (SIGKILL of the agent generating the turn: the
launcher restarts it, or the other agent takes over), ``agent-zombie`` ×5 (that agent SIGSTOPped
past the log's session timeout, then woken: the other agent takes over, the woken one must not
write), ``persister-kill`` ×10 (SIGKILL mid-turn), ``gateway-kill`` ×10 (SIGKILL of the client's
gateway: the client resumes on the other), ``postgres-down`` and ``memory-down`` (every process
of the launcher's PostgreSQL, or memory, SIGSTOPped for ``--outage-s``, 60 s, while turns run;
turns go on, PostgreSQL catches up with exactly the streamed text, recall is skipped and says
so), ``malformed`` (``--frames`` 10,000 requests generated from the protos at every gateway RPC,
bench/fault_frames.py: a clear status each, no hang, no crash), ``soak`` (``--streams`` 1000
concurrent clients for ``--soak-s`` 600 s; RSS and open fds of every process sampled from /proc,
bench/fault_soak.py).

On the embedded profile with the log on a small tmpfs volume: ``disk-full`` ×3 (the volume
filled; starts must be refused with UNAVAILABLE, and the turn runs once space is freed).

On the scale profile (``--profile scale``: Kafka with SASL_SSL, Elasticsearch, a PostgreSQL
server, Envoy): ``kafka-agent-kill`` ×20, ``kafka-broker-restart`` ×3 (the broker SIGKILLed
mid-stream and started again with the launcher's command line; the launcher does not supervise
its servers), ``elasticsearch-down`` (SIGSTOPped for ``--outage-s``). The Kafka jars and the
Elasticsearch distribution are linked from the default state directory's cache (`make up
PROFILE=scale` fetches them).

The launcher runs with ``--restart-budget`` raised (bench/fault_mesh.py): twenty kills in a few
minutes exceed its default budget by design. ``--write`` replaces the table in
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fault_frames, fault_infra, fault_soak
from bench.common import ROOT, machine, p50_p99
from bench.fault_mesh import (
    FAULT_AFTER_TOKENS,
    MAX_TOKENS,
    TOKEN_INTERVAL_MS,
    Followed,
    Launched,
    Outcome,
    follow_turn,
    judge,
    send_signal,
)
from mesh.launcher import MeshStartError, wait_healthy
from mesh.llm.tiny_model import ensure_tiny_model
from mesh.tls import channel_credentials, load_identity
from services.gateway.settings import GatewaySettings

RELIABILITY_DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
# Past the embedded log's session timeout (3 s): the other agent owns the turn by then.
ZOMBIE_PAUSE_S = 8.0


@dataclass(frozen=True)
class Fault:
    mesh: str  # the mesh it runs on: embedded, disk (embedded, log on a small volume), scale
    runs: int  # issue 11's count


FAULTS = {
    "agent-kill": Fault("embedded", 20),
    "agent-zombie": Fault("embedded", 5),
    "persister-kill": Fault("embedded", 10),
    "gateway-kill": Fault("embedded", 10),
    "postgres-down": Fault("embedded", 1),
    "memory-down": Fault("embedded", 1),
    "malformed": Fault("embedded", 1),
    "soak": Fault("embedded", 1),
    "disk-full": Fault("disk", 3),
    "kafka-agent-kill": Fault("scale", 20),
    "kafka-broker-restart": Fault("scale", 3),
    "elasticsearch-down": Fault("scale", 1),
}
SINGLE = ("malformed", "soak")  # one run by nature: ``--runs`` does not apply


@dataclass(frozen=True)
class Options:
    agents: int = 2
    outage_s: float = 60.0
    frames: int = 10_000
    streams: int = 1000
    soak_s: float = 600.0


@dataclass
class FaultResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    processes: dict[str, Any] = field(default_factory=dict)  # soak: per process samples

    def row(self) -> dict[str, Any]:
        recoveries = [o.recovery_s for o in self.outcomes if o.recovery_s is not None]
        p50, p99 = p50_p99(recoveries) if recoveries else (float("nan"), float("nan"))
        return {
            "fault": self.name,
            "mesh": FAULTS[self.name].mesh,
            "runs": len(self.outcomes),
            "turns_lost": sum(not o.finished for o in self.outcomes),
            "tokens_lost": sum(o.lost for o in self.outcomes),
            "tokens_duplicated": sum(o.duplicated for o in self.outcomes),
            "persisted_differs": sum(o.persisted_differs for o in self.outcomes),
            "failed_calls": sum(o.failed_calls for o in self.outcomes),
            "recovery_p50_s": round(p50, 2),
            "recovery_p99_s": round(p99, 2),
            "notes": sorted({o.note for o in self.outcomes if o.note}),
            **({"processes": self.processes} if self.processes else {}),
        }


# -- the faults --------------------------------------------------------------------------------


def kill_during_turn(mesh: Launched, name: str) -> Outcome:
    """SIGKILL ``name`` (``agent``: the agent generating the turn) once the turn has
    FAULT_AFTER_TOKENS tokens; recovery: the client's longest token stall after the kill."""
    outcome = Outcome()
    killed_at: list[float] = []

    def on_token(followed: Followed) -> None:
        if not killed_at and len(followed.seqs) >= FAULT_AFTER_TOKENS:
            target = mesh.running_agent() if name == "agent" else name
            if target is None:
                return  # not generating at this instant: try at the next token
            killed_at.append(time.monotonic())
            send_signal(mesh.service(target)["pid"], signal.SIGKILL)

    followed = follow_turn(mesh, f"fault {name} {random.random()}", on_token)
    if killed_at:
        outcome.recovery_s = followed.stall_after(killed_at[0])
    else:
        outcome.note = "the turn ended before the fault"
    return judge(mesh, followed, outcome)


def zombie_agent(mesh: Launched, pause_s: float) -> Outcome:
    """SIGSTOP the agent generating the turn for ``pause_s``, past the log's session timeout: the
    other agent takes the turn over, and the stopped one, woken, must not write into it (its
    appends are fenced; readers would drop a copy anyway, docs/reliability.md). Recovery: the
    client's longest token stall after the stop."""
    outcome = Outcome()
    stopped: list[tuple[float, int]] = []

    def on_token(followed: Followed) -> None:
        if not stopped and len(followed.seqs) >= FAULT_AFTER_TOKENS:
            target = mesh.running_agent()
            if target is None:
                return
            pid = mesh.service(target)["pid"]
            stopped.append((time.monotonic(), pid))
            send_signal(pid, signal.SIGSTOP)
            threading.Timer(pause_s, send_signal, (pid, signal.SIGCONT)).start()

    followed = follow_turn(mesh, f"fault zombie {random.random()}", on_token)
    if stopped:
        outcome.recovery_s = followed.stall_after(stopped[0][0])
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
            send_signal(mesh.service("persister")["pid"], signal.SIGKILL)

    followed = follow_turn(mesh, f"fault persister {random.random()}", on_token)
    judge(mesh, followed, outcome)  # waits until PostgreSQL holds the turn
    if killed_at and outcome.finished and not outcome.persisted_differs:
        outcome.recovery_s = time.monotonic() - followed.finished_at
    elif not killed_at:
        outcome.note = "the turn ended before the fault"
    return outcome


# -- running and reporting ---------------------------------------------------------------------

Injector = Callable[[Launched, Options], Outcome]
INJECT: dict[str, Injector] = {
    "agent-kill": lambda mesh, _: kill_during_turn(mesh, "agent"),
    "kafka-agent-kill": lambda mesh, _: kill_during_turn(mesh, "agent"),
    "agent-zombie": lambda mesh, _: zombie_agent(mesh, ZOMBIE_PAUSE_S),
    "persister-kill": lambda mesh, _: kill_persister(mesh),
    "gateway-kill": lambda mesh, _: kill_during_turn(mesh, "gateway-1"),
    "postgres-down": lambda mesh, o: fault_infra.freeze(
        mesh, "postgres", lambda: mesh.infra_pids("postgres"), o.outage_s
    ),
    "memory-down": lambda mesh, o: fault_infra.freeze(
        mesh, "memory", lambda: [mesh.service("memory")["pid"]], o.outage_s
    ),
    "elasticsearch-down": lambda mesh, o: fault_infra.freeze(
        mesh, "elasticsearch", lambda: mesh.infra_pids("elasticsearch"), o.outage_s
    ),
    "kafka-broker-restart": lambda mesh, _: fault_infra.restart_broker(mesh),
    "disk-full": lambda mesh, _: fault_infra.disk_full(mesh),
    "malformed": lambda mesh, o: fault_frames.malformed(mesh, o.frames),
}


def run(only: Sequence[str], runs: int | None, options: Options) -> dict[str, Any]:
    """Each mesh the chosen faults need, started once; their faults in FAULTS' order."""
    model = ensure_tiny_model(ROOT / ".state" / "models")
    results: list[FaultResult] = []
    started = time.monotonic()
    interrupted = False
    try:
        for kind in ("embedded", "disk", "scale"):
            names = [n for n in FAULTS if n in only and FAULTS[n].mesh == kind]
            if not names:
                continue
            with _mesh(kind, model, options) as mesh:
                follow_turn(mesh, "warm up")  # the model loaded, the first turn's costs paid
                for name in names:
                    results.append(FaultResult(name))
                    _run_fault(mesh, results[-1], runs, options)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the runs done so far
        interrupted = True
    return {
        "machine": machine(),
        "load_average": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1),
        "interrupted": interrupted,
        "options": options.__dict__,
        "rows": [r.row() for r in results if r.outcomes],
    }


def _run_fault(mesh: Launched, result: FaultResult, runs: int | None, options: Options) -> None:
    name = result.name
    count = 1 if name in SINGLE else (runs or FAULTS[name].runs)
    for i in range(count):
        print(f"faults: {name} run {i + 1}/{count}", file=sys.stderr, flush=True)
        if name == "agent-zombie" and mesh.agents < 2:
            result.outcomes.append(Outcome(finished=True, note="needs --agents 2"))
            break
        try:
            if name == "soak":
                outcome, result.processes = fault_soak.soak(mesh, options.streams, options.soak_s)
            else:
                outcome = INJECT[name](mesh, options)
        except Exception as error:  # a run that broke counts, and the suite goes on
            outcome = Outcome(failed_calls=1, note=f"run failed: {error}"[:300])
        result.outcomes.append(outcome)
        try:
            _wait_restarted(mesh, timeout_s=180)
        except MeshStartError as error:
            outcome.failed_calls += 1
            outcome.note += f" not healthy again: {str(error).splitlines()[0]}"[:300]


def _mesh_env(options: Options) -> dict[str, str]:
    """Gateway limits above the soak's streams (one tenant opens them all)."""
    room = options.streams + 100
    return GatewaySettings.env_for(
        max_streams=room, max_streams_per_tenant=room,
        max_queued_turns=room, max_queued_turns_per_tenant=room,
    )  # fmt: skip


@contextmanager
def _mesh(kind: str, model: Path, options: Options) -> Iterator[Launched]:
    root = Path(tempfile.mkdtemp(prefix="mesh-faults-"))
    root.chmod(0o755)  # run as root, PostgreSQL runs as its own user and must reach its data
    prepare = fault_infra.mount_log_volume if kind == "disk" else None
    profile = "scale" if kind == "scale" else "embedded"
    print(f"faults: starting the {kind} mesh in {root}", file=sys.stderr, flush=True)
    mesh = None
    try:
        mesh = Launched(
            root, model, options.agents, profile=profile, env=_mesh_env(options), prepare=prepare
        )
        yield mesh
    finally:
        if mesh is not None:
            mesh.stop()
        if kind == "disk":
            fault_infra.unmount_log_volume(root / "state")
        shutil.rmtree(root, ignore_errors=True)


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
    m, o = report["machine"], report["options"]
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    lines = [
        f"Measured on {m['cpu_model']} ({m['cpus']} CPUs, {m['memory_gib']} GiB), load {load} "
        f"at the end, in {report['seconds']} s"
        f"{' (interrupted: the runs done until then)' if report['interrupted'] else ''}; "
        "through the launcher, two gateways, "
        f"{o['agents']} agents, tiny model paced at {TOKEN_INTERVAL_MS} ms/token, "
        f"{MAX_TOKENS}-token turns; outages {o['outage_s']:.0f} s. Mesh: embedded profile; disk: "
        f"embedded with the log on a {fault_infra.LOG_VOLUME_MB} MB tmpfs; scale: Kafka "
        "(SASL_SSL), Elasticsearch, PostgreSQL server, Envoy.",
        "",
        "| fault | mesh | runs | turns lost | tokens lost | tokens duplicated "
        "| persisted ≠ streamed | failed calls, restarts | recovery p50 | recovery p99 | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['fault']} | {row['mesh']} | {row['runs']} | {row['turns_lost']} "
            f"| {row['tokens_lost']} | {row['tokens_duplicated']} | {row['persisted_differs']} "
            f"| {row['failed_calls']} | {row['recovery_p50_s']} s | {row['recovery_p99_s']} s "
            f"| {'; '.join(row['notes'])} |"
        )
    for row in report["rows"]:
        if row.get("processes"):
            lines += ["", *_soak_table(row["processes"])]
    return "\n".join(lines)


def _soak_table(processes: dict[str, Any]) -> list[str]:
    lines = [
        "Soak, per process (first sample under full load → last, max):",
        "",
        "| process | RSS MiB first → last (max) | open fds first → last (max) | flat |",
        "| --- | --- | --- | --- |",
    ]
    for name, p in processes.items():
        (r0, r1, rmax), (f0, f1, fmax) = p["rss_mib"], p["fds"]
        flat = "yes" if p["flat"] else "no"
        lines.append(f"| {name} | {r0} → {r1} ({rmax}) | {f0} → {f1} ({fmax}) | {flat} |")
    return lines


def write_doc(text: str) -> None:
    doc = RELIABILITY_DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    RELIABILITY_DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", action="append", choices=list(FAULTS), help="repeatable")
    parser.add_argument("--runs", type=int, help="runs per fault (default: the issue's counts)")
    parser.add_argument("--outage-s", type=float, default=Options.outage_s)
    parser.add_argument("--frames", type=int, default=Options.frames, help="malformed frames")
    parser.add_argument("--streams", type=int, default=Options.streams, help="soak streams")
    parser.add_argument("--soak-s", type=float, default=Options.soak_s, help="soak duration")
    parser.add_argument("--agents", type=int, default=Options.agents, help="zombie needs 2")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--write", action="store_true", help=f"update {RELIABILITY_DOC.name}")
    args = parser.parse_args(argv)
    # SIGTERM (a background run's stop) unwinds like Ctrl-C: every mesh is stopped, no orphans.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    options = Options(args.agents, args.outage_s, args.frames, args.streams, args.soak_s)
    report = run(args.only or list(FAULTS), args.runs, options)
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
