"""Backends: each merges a job and writes it into a staging directory, and verifies what it wrote."""
