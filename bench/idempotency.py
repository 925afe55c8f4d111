"""What a ``request_id`` costs a start: time to ``TurnAccepted`` with and without one.

``python -m bench.idempotency [--turns 300]`` starts the mesh users run (``python -m
mesh.launcher``, the embedded profile, two gateways, the tiny test model) and runs the turns one
at a time on gateway-1, alternating starts without and with a fresh request id (which adds the
persister's ``ClaimRequestId``), one token each, then prints p50/p90/p99 of each. A last
section retries every request id on gateway-2 and times the retry's ``TurnAccepted`` (the claim
lost, then the winner's turn looked up on the log).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc

from bench.common import ROOT
from bench.fault_mesh import Launched
from mesh.llm.tiny_model import ensure_tiny_model


def _accepted_ms(
    stub: gateway_service_pb2_grpc.GatewayServiceStub, key: str, request_id: str
) -> tuple[float, str]:
    """Milliseconds from the call to its TurnAccepted; the stream is read to its end."""
    start = gateway_pb2.StartTurn(text="hi", request_id=request_id)
    start.options.max_tokens = 1
    began = time.perf_counter()
    accepted_ms, turn_id = 0.0, ""
    for frame in stub.StreamTurn(
        gateway_pb2.StreamTurnRequest(start=start), metadata=(("x-api-key", key),), timeout=60
    ):
        if frame.WhichOneof("frame") == "accepted" and not turn_id:
            accepted_ms = (time.perf_counter() - began) * 1000
            turn_id = frame.accepted.turn_id
    return accepted_ms, turn_id


def _percentiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {cuts[49]:.2f} ms  p90 {cuts[89]:.2f} ms  p99 {cuts[98]:.2f} ms  (n={len(values)})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idempotency", description=__doc__)
    parser.add_argument("--turns", type=int, default=300, help="turns of each kind")
    args = parser.parse_args(argv)
    model = ensure_tiny_model(ROOT / ".state" / "models")
    with tempfile.TemporaryDirectory(prefix="bench-idem-") as scratch:
        mesh = Launched(Path(scratch), model, agents=1)
        try:
            first, second = mesh.gateways()
            plain: list[float] = []
            keyed: list[float] = []
            retried: list[float] = []
            ids: list[tuple[str, str]] = []
            with grpc.insecure_channel(first) as one, grpc.insecure_channel(second) as two:
                stub_one = gateway_service_pb2_grpc.GatewayServiceStub(one)  # type: ignore[no-untyped-call]
                stub_two = gateway_service_pb2_grpc.GatewayServiceStub(two)  # type: ignore[no-untyped-call]
                for _ in range(10):  # warm-up: channels, the agent's first turns
                    _accepted_ms(stub_one, mesh.key, "")
                for _ in range(args.turns):
                    plain.append(_accepted_ms(stub_one, mesh.key, "")[0])
                    request_id = uuid.uuid4().hex
                    took, turn_id = _accepted_ms(stub_one, mesh.key, request_id)
                    keyed.append(took)
                    ids.append((request_id, turn_id))
                for request_id, turn_id in ids:
                    took, again = _accepted_ms(stub_two, mesh.key, request_id)
                    if again != turn_id:
                        raise SystemExit(f"retry of {request_id} got {again}, not {turn_id}")
                    retried.append(took)
        finally:
            mesh.stop()
    print(f"without request_id:            {_percentiles(plain)}")
    print(f"with a new request_id:         {_percentiles(keyed)}")
    print(f"retry on the other gateway:    {_percentiles(retried)}")
    print(
        "added by the claim (p50):      "
        f"{statistics.median(keyed) - statistics.median(plain):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
