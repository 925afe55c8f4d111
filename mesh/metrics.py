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


# The OpenTelemetry GenAI semantic conventions' server metrics, as Prometheus names them (dots to
# underscores, the unit as a suffix), with the conventions' bucket boundaries. The agent records
# them: it is the model server, and they time a turn from its claim, as vLLM's do from a
# request's arrival. mesh_time_to_first_token_seconds{service="gateway"} stays beside them: it is
# what the client sees, the queue and the log included.
_GEN_AI_LABELS = ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name"]
GEN_AI_TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai.server.time_to_first_token: time to generate the first token, successful turns.",
    _GEN_AI_LABELS,
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0),
)  # fmt: skip
GEN_AI_TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai.server.time_per_output_token: time per token after the first, successful turns.",
    _GEN_AI_LABELS,
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
)
GEN_AI_REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "gen_ai.server.request.duration: claim to last token; error_type is set on failures.",
    [*_GEN_AI_LABELS, "error_type"],
    buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
             81.92),
)  # fmt: skip
CONSUMER_LAG = Gauge(
    "mesh_consumer_lag_records",
    "Records of a partition not yet committed by a consumer group (end offset - committed).",
    ["group", "topic", "partition"],
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on ``host:port`` (0 picks a free port) and return the bound port.

    A negative port (``MESH_<SERVICE>_METRICS_PORT=-1``) turns the endpoint off and returns -1.
    """
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
