"""Launchers for real servers: Kafka, Elasticsearch, Envoy (PostgreSQL is mesh.pg)."""
