"""Affinity for drafter pools: every draft step of a verifier's requests goes to the same replica.

A verifier's ``RemoteDrafter`` sends each step's requests in one call, so their sessions must live on one
replica; the routing key is that adapter's random prefix (one per verifier replica), and verifiers spread
over the pool. Serve's multiplexed routing learns which replica holds an id from reports the replicas push
to the controller, so a key's first calls land at random and its state ends up on several replicas. Here
the choice is a pure function of the key and the current replica set (rendezvous hashing): the first call
already lands where all later ones will, and scaling moves only the keys of the replicas that came or
went. The key travels as the multiplexed model id (``handle.options(multiplexed_model_id=key)``); a call
without one is routed like Serve's default.
"""

from __future__ import annotations

import hashlib
import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "deploy.routing:RequestAffinityRouter"


def rendezvous_order(key: str, replica_ids: list[str]) -> list[int]:
    """Indices of ``replica_ids`` from the key's owner down (highest hash of key + replica first)."""
    scores = [hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest() for rid in replica_ids]
    return sorted(range(len(replica_ids)), key=scores.__getitem__, reverse=True)


class RequestAffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        ranked = [candidate_replicas[i] for i in order]
        # The owner first; if it is at max_ongoing_requests the next ones take it (and rebuild the state).
        return [ranked[:1], ranked[1:]]
