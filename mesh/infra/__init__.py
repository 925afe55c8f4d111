"""Launchers for real servers: Kafka, Elasticsearch, a PostgreSQL server (Debian) and Envoy.

They share ``process`` (spawn a server, wait until it is ready, stop its process group) and
``maven`` (fetch from Maven Central once per machine). The embedded profile's PostgreSQL (the
pgserver wheel) is mesh.pg.
"""
