"""Retrieval memory: chunking, embeddings and the stores behind the memory service."""
