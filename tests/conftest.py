"""Shared fixtures. Each fixture module under tests/fixtures/ starts one kind of real server."""

pytest_plugins = [
    "tests.fixtures.certs",
    "tests.fixtures.postgres",
    "tests.fixtures.kafka",
    "tests.fixtures.elasticsearch",
    "tests.fixtures.envoy",
    "tests.fixtures.mesh",
    "tests.fixtures.scale",
]
