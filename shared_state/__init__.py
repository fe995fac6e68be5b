"""Adaptive n-gram statistics shared across requests and replicas. A leaf: no models, Ray or gRPC."""

from shared_state.base import NGramStore, StoreConfig
from shared_state.memory import MemoryStore

__all__ = ["NGramStore", "StoreConfig", "MemoryStore"]
