"""Launchers for real servers: Kafka, Elasticsearch, a PostgreSQL server (Debian) and Envoy.

The embedded profile's PostgreSQL (the pgserver wheel) is mesh.pg.
"""
