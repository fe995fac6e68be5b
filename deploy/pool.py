"""The drafter-pool deployment (tri-gram and auxiliary drafters): a DrafterHost behind Serve."""

from __future__ import annotations

import asyncio

import torch

from actors.engine import freeze_gc_heap
from actors.models import load_model, load_tokenizer
from deploy.config import ServeConfig
from deploy.drafters import DrafterHost, build_drafters
from deploy.metrics import pool_metrics
from specd_api.v1 import specd_pb2 as pb


class DrafterPool:
    def __init__(self, config: dict, role: str) -> None:
        cfg = ServeConfig.model_validate(config)
        torch.set_num_threads(cfg.threads())
        # The target's weights are never run here: drafters need its tokenizer, identity and vocabulary size.
        target = load_tokenizer(cfg.model, device_type=cfg.verifier_device_type(), dtype=cfg.dtype)
        aux = role == "aux"
        draft = load_model(cfg.draft_model, device=cfg.device, dtype=cfg.dtype) if aux and cfg.draft_model else None
        methods = cfg.aux_methods if aux else cfg.trigram_methods
        self.host = DrafterHost(build_drafters(cfg, methods, target, draft), max_sessions=cfg.drafter_sessions,
                                vocab_size=target.vocab_size)
        self.metrics = pool_metrics(role)
        # A tri-gram draft is a millisecond of Python: run it inline on the event loop (a thread hop costs as
        # much). A draft model's forwards take tens of ms and release the GIL: a thread lets requests overlap.
        self.threaded = aux
        freeze_gc_heap()

    def info(self) -> dict[str, int]:
        return self.host.info()

    async def step(self, payload: bytes) -> bytes:
        """One DraftStepRequest -> DraftStepResponse (serialized: the contract, and cheap to move)."""
        req = pb.DraftStepRequest.FromString(payload)
        reply = await asyncio.to_thread(self.host.step, req) if self.threaded else self.host.step(req)
        if reply.rebuilt and req.prompt_len < len(req.context):
            self.metrics.rebuilds.inc()
        return reply.SerializeToString()

    async def finish(self, request_id: str) -> None:
        self.host.finish(request_id)

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self.host.sessions), "rebuilds": self.host.rebuilds}
