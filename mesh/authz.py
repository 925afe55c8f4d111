"""Which mesh identity may call which internal RPC: one table, one interceptor.

The caller's identity is the ``spiffe://llm-mesh/<name>`` URI SAN of the certificate it
presented in the mutual-TLS handshake (``mesh.tls``): a fact the CA vouches for, never a field
of the request. Health and reflection are open to every caller that completed the handshake;
every other method is denied unless the table names the caller (deny by default, so a new RPC
is closed until someone decides who needs it).

Who calls what, from the code:

- the gateway reads conversations from the persister (history pages, conversation checks);
- agents read history from the persister and recall from memory;
- the persister indexes finished turns into memory (``Remember``) and has it forget an erased
  conversation or tenant (``Forget``);
- the gateway erases a conversation of its caller's tenant (``DeleteConversation``), finds
  a turn it resumes or cancels (``LookupTurn``) and claims the request ids of idempotent
  starts (``ClaimRequestId``);
- nothing in the mesh calls an agent's direct ``Generate`` and ``GetNodeInfo``, memory's
  ``Ingest``, or the persister's ``Flush``, ``GetStats`` and ``EraseTenant``: they are operator
  tools, for a person or a probe holding the ``operator`` certificate (``mesh erase`` calls
  ``DeleteConversation`` and ``EraseTenant`` with it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from grpc import StatusCode, aio

from mesh.interceptors import Handler, _WrappingInterceptor, wrap_handler
from mesh.tls import identity_of, spiffe_id

log = logging.getLogger(__name__)

GATEWAY, AGENT, MEMORY, PERSISTER, OPERATOR = "gateway", "agent", "memory", "persister", "operator"

_AGENT = "/chat.agent.v1.AgentService/"
_MEMORY = "/chat.memory.v1.MemoryService/"
_PERSISTER = "/chat.persister.v1.PersisterService/"

# The one table: method -> the identities that may call it.
POLICY: Mapping[str, frozenset[str]] = {
    _AGENT + "Generate": frozenset({OPERATOR}),
    _AGENT + "GetNodeInfo": frozenset({OPERATOR}),
    _MEMORY + "Remember": frozenset({PERSISTER}),
    _MEMORY + "Recall": frozenset({AGENT}),
    _MEMORY + "Ingest": frozenset({OPERATOR}),
    _MEMORY + "Forget": frozenset({PERSISTER, OPERATOR}),
    _PERSISTER + "GetConversation": frozenset({GATEWAY, AGENT}),
    _PERSISTER + "ListConversations": frozenset({GATEWAY, AGENT}),
    _PERSISTER + "ListMessages": frozenset({GATEWAY, AGENT}),
    _PERSISTER + "Flush": frozenset({OPERATOR}),
    _PERSISTER + "GetStats": frozenset({OPERATOR}),
    _PERSISTER + "DeleteConversation": frozenset({GATEWAY, OPERATOR}),
    _PERSISTER + "EraseTenant": frozenset({OPERATOR}),
    _PERSISTER + "LookupTurn": frozenset({GATEWAY}),
    _PERSISTER + "ClaimRequestId": frozenset({GATEWAY}),
}

# Services every authenticated caller may use: probes and grpcurl need them.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def allowed_callers(method: str, policy: Mapping[str, frozenset[str]] = POLICY) -> frozenset[str]:
    """The identities that may call ``method`` (``/pkg.Service/Method``); empty: nobody."""
    return policy.get(method, frozenset())


def is_open(method: str) -> bool:
    return method.lstrip("/").partition("/")[0] in OPEN_SERVICES


def peer_identities(context: aio.ServicerContext[Any, Any]) -> list[str]:
    """The mesh identities in the caller's certificate (usually one); empty for none."""
    auth = context.auth_context()
    uris = auth.get("peer_uri") or auth.get("x509_subject_alternative_name") or []
    found = []
    for raw in uris:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        name = identity_of(text)
        if name is not None:
            found.append(name)
    return found


def denial(method: str, callers: list[str], allowed: frozenset[str]) -> str:
    """The PERMISSION_DENIED message: who called, who may, and what to do about it."""
    who = ", ".join(map(spiffe_id, callers)) if callers else "a certificate without a mesh identity"
    if not allowed:
        may = "no mesh identity may call it"
    else:
        may = "only " + ", ".join(map(spiffe_id, sorted(allowed))) + " may call it"
    return (
        f"{method}: {who} is not allowed; {may}. Call it with the right service's certificate "
        "(MESH_TLS_CERT/MESH_TLS_KEY, from `mesh certs issue <service>`), or change "
        "mesh.authz.POLICY if this identity truly needs it"
    )


class AuthzInterceptor(_WrappingInterceptor):
    """Authorizes each RPC by the caller's certificate identity against ``policy``.

    Put it after the metrics interceptor (denials are counted) and before the error interceptor.
    """

    def __init__(self, service: str, policy: Mapping[str, frozenset[str]] = POLICY) -> None:
        self._service = service
        self._policy = policy

    def wrap(self, handler: Handler, method: str) -> Handler:
        if handler is None or is_open(method):
            return handler
        allowed = allowed_callers(method, self._policy)
        service = self._service

        async def check(ctx: aio.ServicerContext[Any, Any]) -> None:
            callers = peer_identities(ctx)
            if allowed.intersection(callers):
                return
            message = denial(method, callers, allowed)
            log.warning("%s denied: %s", service, message)
            await ctx.abort(StatusCode.PERMISSION_DENIED, message)

        async def unary(
            run: Callable[[], Awaitable[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> Any:
            await check(ctx)
            return await run()

        async def streaming(
            run: Callable[[], AsyncIterator[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await check(ctx)
            async for item in run():
                yield item

        return wrap_handler(handler, method, unary, streaming)


__all__ = [
    "AGENT",
    "GATEWAY",
    "MEMORY",
    "OPEN_SERVICES",
    "OPERATOR",
    "PERSISTER",
    "POLICY",
    "AuthzInterceptor",
    "allowed_callers",
    "denial",
    "is_open",
    "peer_identities",
]
