"""The agent's gRPC face (proto <-> core dataclasses), server assembly and ``main``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from chat.agent.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc
from chat.common.v1 import common_pb2
from grpc import aio

from mesh.codec import finish_reason_to_proto, options_from_proto
from mesh.errors import InvalidArgument, MeshError
from mesh.llm.engine import Device, EngineError, LlamaEngine
from mesh.log import TURN_EVENTS, EventLog, open_log
from mesh.readiness import Probe, Readiness
from mesh.server import (
    ServiceDeps,
    build_service_server,
    run_main,
    serve_until_signalled,
    start_metrics,
)
from services.agent.clients import DependencyClients
from services.agent.core import (
    METRICS_SERVICE,
    AgentCore,
    GenerateRequest,
    GenerationFinished,
    Limits,
    Token,
    check_cancel_frame,
    duplicate_start,
    no_generation,
)
from services.agent.prompt import ChatMessage, PromptBuilder
from services.agent.settings import AgentSettings
from services.agent.worker import TurnWorker

log = logging.getLogger("services.agent")

SERVICE_NAME: str = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

_Context = aio.ServicerContext[Any, Any]

_DEVICES = {Device.CPU: agent_pb2.DEVICE_CPU, Device.GPU: agent_pb2.DEVICE_GPU}


def _start_request(start: agent_pb2.StartGeneration) -> GenerateRequest:
    return GenerateRequest(
        generation_id=start.generation_id,
        user_text=start.user_text,
        history=tuple(ChatMessage(turn.role, turn.text) for turn in start.history),
        context_passages=tuple(p for p in start.context_passages if p.strip()),
        options=options_from_proto(start.options),
    )


def _finished_frame(event: GenerationFinished) -> agent_pb2.GenerateResponse:
    return agent_pb2.GenerateResponse(
        finished=agent_pb2.GenerationFinished(
            finish_reason=finish_reason_to_proto(event.finish_reason),
            usage=common_pb2.TokenUsage(
                prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens
            ),
            time_to_first_token_ms=event.time_to_first_token_ms,
            total_ms=event.total_ms,
        )
    )


class AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    """Converts between proto frames and ``AgentCore`` calls; holds no logic of its own."""

    def __init__(self, core: AgentCore) -> None:
        self._core = core

    async def Generate(
        self, request_iterator: AsyncIterator[agent_pb2.GenerateRequest], context: _Context
    ) -> AsyncIterator[agent_pb2.GenerateResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument(
                "the stream ended before a start frame", field="start", reason="START_MISSING"
            )
        kind = first.WhichOneof("frame")
        if kind == "cancel":
            raise no_generation()
        if kind != "start":
            raise InvalidArgument(
                "the first frame must be a start frame", field="start", reason="START_MISSING"
            )
        request = _start_request(first.start)
        cancel = asyncio.Event()
        violation: list[MeshError] = []

        async def read_frames() -> None:
            async for frame in request_iterator:
                which = frame.WhichOneof("frame")
                try:
                    if which == "start":
                        raise duplicate_start()
                    if which == "cancel":
                        check_cancel_frame(request.generation_id, frame.cancel.generation_id)
                        cancel.set()
                except MeshError as error:
                    violation.append(error)
                    cancel.set()
                    return

        reader = asyncio.create_task(read_frames())
        try:
            async with contextlib.aclosing(self._core.generate(request, cancel)) as events:
                async for event in events:
                    if violation:
                        break
                    if isinstance(event, Token):
                        yield agent_pb2.GenerateResponse(
                            token=agent_pb2.GeneratedToken(seq=event.index, text=event.text)
                        )
                    else:
                        # A protocol error that arrived with the last token still fails the call.
                        await asyncio.sleep(0)
                        if violation:
                            break
                        yield _finished_frame(event)
            if violation:
                raise violation[0]
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def GetNodeInfo(
        self, request: agent_pb2.GetNodeInfoRequest, context: _Context
    ) -> agent_pb2.GetNodeInfoResponse:
        info = self._core.node_info()
        return agent_pb2.GetNodeInfoResponse(**(asdict(info) | {"device": _DEVICES[info.device]}))


@dataclass
class AgentDeps(ServiceDeps):
    """What the server runs on: the core over a started engine (``build_core``)."""

    core: AgentCore


def build_core(settings: AgentSettings, engine: LlamaEngine) -> AgentCore:
    prompts = PromptBuilder(
        count_tokens=engine.count_segments,
        n_ctx=engine.n_ctx,
        chat_template=engine.chat_template,
        bos_token=engine.bos_text,
        eos_token=engine.eos_text,
        system_prompt=settings.system_prompt,
    )
    # The agent's settings name each limit as Limits does.
    limits = Limits(**{field.name: getattr(settings, field.name) for field in fields(Limits)})
    return AgentCore(
        engine=engine,
        prompts=prompts,
        agent_id=settings.agent_id,
        limits=limits,
        prompt_log=settings.prompt_log,
    )


def build_server(settings: AgentSettings, deps: AgentDeps) -> tuple[aio.Server, int]:
    """The agent gRPC server, bound but not started, and its port."""
    server, port, deps.health = build_service_server(
        METRICS_SERVICE,
        SERVICE_NAME,
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server,
        AgentServicer(deps.core),
        host=settings.host,
        port=settings.port,
        tls=settings.tls,
    )
    return server, port


async def serve(settings: AgentSettings) -> None:
    """Load the model, serve (and consume turns) until SIGTERM/SIGINT, drain, unload."""
    engine = LlamaEngine(
        settings.model_path,
        n_ctx=settings.n_ctx,
        n_threads=settings.threads,
        n_gpu_layers=settings.gpu_layers,
        seed=settings.seed,
        slots=settings.slots,
        prefill_chunk=settings.prefill_chunk,
        kv_cache_tokens=settings.kv_cache_tokens or None,
        min_token_interval_s=settings.min_token_interval_ms / 1000,
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(engine)
        core = build_core(settings, engine)
        deps = AgentDeps(core=core)
        server, port = build_server(settings, deps)
        assert deps.health is not None
        worker: TurnWorker | None = None
        if settings.worker:
            event_log: EventLog = await stack.enter_async_context(open_log(settings.log))
            clients = await stack.enter_async_context(
                DependencyClients(
                    persister_addr=settings.persister_addr,
                    memory_addr=settings.memory_addr,
                    timeout_s=settings.dependency_timeout_s,
                    attempts=settings.dependency_attempts,
                    tls=settings.tls,
                    history_messages=settings.history_messages,
                )
            )
            worker = TurnWorker(
                log=event_log,
                core=core,
                clients=clients,
                agent_id=settings.agent_id,
                partitions=settings.log.partitions,
                recall_top_k=settings.recall_top_k,
                parallel=settings.slots,
                read_ahead=settings.read_ahead,
                max_turn_s=settings.max_turn_s,
                orphan_grace_s=settings.orphan_grace_s,
                log_user_text=settings.log_user_text,
            )
        metrics_port = start_metrics(settings.metrics_port, settings.host)
        readiness: Readiness | None = None

        async def drain() -> None:
            if worker is not None:
                await worker.stop(settings.grace_s)

        if worker is not None:
            await worker.start()
            # A crash or cancellation must not leave the worker's tasks running.
            stack.push_async_callback(worker.stop)
            # Ready while the log takes the turns' events; history and recall only degrade.
            readiness = await stack.enter_async_context(
                Readiness(
                    "agent",
                    [Probe("log", lambda: event_log.check_writable(TURN_EVENTS))],
                    settings.health,
                )
            )
        # Tests and supervisors read this line to find the ports when they asked for port 0.
        log.info(
            "agent service listening on %s:%d (metrics on port %s, model %s, device %s, "
            "worker %s, id %s)",
            settings.host,
            port,
            metrics_port,
            engine.model_name,
            engine.device.value,
            "on" if worker is not None else "off",
            settings.agent_id,
        )
        await serve_until_signalled(
            server,
            deps.health,
            [SERVICE_NAME],
            grace_s=settings.grace_s,
            on_drain=drain,
            readiness=readiness,
        )
    log.info("agent service stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.agent``; configuration comes from the environment."""
    del argv  # no flags: the environment is the single source of configuration
    return run_main(
        "agent", lambda: AgentSettings.from_env(os.environ), serve, fatal_errors=(EngineError,)
    )


__all__ = [
    "SERVICE_NAME",
    "AgentDeps",
    "AgentServicer",
    "build_core",
    "build_server",
    "main",
    "serve",
]
