"""Side-by-side benchmarks of the mesh: ``python -m bench`` (or ``make bench``).

Every row compares two things measured in the same run on the same machine (the mesh against a
direct llama.cpp call, the gateway against a bare gRPC stream, batched against per-row writes),
because on shared machines only ratios measured together mean anything. Rows:

- ``ttft``: time to first token and inter-token latency, direct llama.cpp vs a turn through the
  whole mesh (embedded log; Kafka too with ``--kafka``).
- ``throughput``: generation tokens/s through the mesh / direct (same runs as ``ttft``).
- ``relay``: tokens/s and per-token latency through a gateway fed by a synthetic agent, vs a
  bare grpc.aio server-streaming echo, at 1, 100 and 1000 concurrent streams.
- ``log``: append -> read latency to another process (embedded log; Kafka with ``--kafka``),
  vs an OS pipe between the same two processes.
- ``persistence``: batched (COPY) vs one INSERT per row token writes on PostgreSQL.
- ``recall``: memory recall latency at 10k and 100k chunks, pgvector (and Elasticsearch with
  ``--es``).

Results print as a table and go to ``artifacts/bench.json``; targets print PASS or MISS and are
never asserted by the test suite (tests/integration/test_bench_smoke.py only checks the harness
runs). docs/performance.md holds the latest full table.
"""
