"""Prometheus metrics shared by every service.

One definition per metric so names and labels agree across processes. Labels never carry a
tenant id, a conversation id or anything else a tenant could learn about another from.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

TIME_TO_FIRST_TOKEN = Histogram(
    "mesh_time_to_first_token_seconds",
    "Time from a turn being accepted (gateway) or started (agent) to its first token.",
    ["service", "model"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "mesh_inter_token_latency_seconds",
    "Time between consecutive tokens of one turn.",
    ["service", "model"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "mesh_queue_depth",
    "Turns accepted or claimed but not yet generating.",
    ["service"],
)
ACTIVE_STREAMS = Gauge(
    "mesh_active_streams",
    "Streaming RPCs currently open.",
    ["service", "method"],
)
TOKENS_GENERATED = Counter(
    "mesh_tokens_generated_total",
    "Tokens generated, by model.",
    ["model"],
)
RPCS_HANDLED = Counter(
    "mesh_rpcs_handled_total",
    "RPCs completed, by final status code.",
    ["service", "method", "code"],
)
RPC_ERRORS = Counter(
    "mesh_rpc_errors_total",
    "RPCs that ended with a status other than OK, by code.",
    ["service", "method", "code"],
)
API_KEYS_FILE_ERRORS = Counter(
    "mesh_api_keys_file_errors_total",
    "Changes to the API keys file that could not be loaded; the last good keys stay in use.",
    ["service"],
)
API_KEYS_FILE_VALID = Gauge(
    "mesh_api_keys_file_valid",
    "1 while the API keys file as it is on disk is in use, 0 while a broken edit is ignored.",
    ["service"],
)
TURNS = Counter(
    "mesh_turns_total",
    "Turns ended, by finish reason.",
    ["service", "finish_reason"],
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on ``host:port`` (0 picks a free port) and return the bound port.

    A negative port (``MESH_<SERVICE>_METRICS_PORT=-1``) turns the endpoint off and returns -1.
    """
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
