"""Readers and writers of embedding files, one module per container (see docs/architecture.md)."""
