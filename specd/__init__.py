"""User-facing tools: the `specd` CLI, benchmarks, and (later) the client library."""
