"""The persister: assembles turns from the logs into PostgreSQL and serves history."""
