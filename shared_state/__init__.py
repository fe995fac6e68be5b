"""Adaptive n-gram statistics shared across requests and replicas. A leaf: no models, Ray or gRPC."""

from shared_state.base import NGramStore, StoreConfig
from shared_state.memory import MemoryStore

__all__ = ["NGramStore", "StoreConfig", "MemoryStore", "RedisStore", "RedisOptions"]


def __getattr__(name: str):
    # Lazy: ``import shared_state`` must not import redis for the in-memory default.
    if name in ("RedisStore", "RedisOptions"):
        from shared_state import redis_store

        return getattr(redis_store, name)
    raise AttributeError(f"module 'shared_state' has no attribute {name!r}")
