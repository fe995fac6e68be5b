"""The drafter-pool deployment (tri-gram and auxiliary drafters): a DrafterHost behind Serve."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from actors.process import freeze_gc_heap
from actors.models import load_model, load_tokenizer
from deploy.config import ServeConfig
from deploy.drafters import DrafterHost, build_drafters
from deploy.metrics import pool_metrics
from specd_api.v1 import specd_pb2 as pb


class DrafterPool:
    def __init__(self, config: dict, role: str) -> None:
        cfg = ServeConfig.model_validate(config)
        aux = role == "aux"
        # A draft model loads and runs on one thread, the only one here that runs torch (actors.loop: a second
        # thread slows every forward), so the pool's steps take turns on it. A tri-gram draft is a
        # millisecond of Python: it runs inline on the event loop (a thread hop costs as much).
        self._torch = ThreadPoolExecutor(1, thread_name_prefix="torch") if aux else None
        self.host = self._torch.submit(self._build, cfg, aux).result() if aux else self._build(cfg, aux)
        self.metrics = pool_metrics(role)
        freeze_gc_heap()

    @staticmethod
    def _build(cfg: ServeConfig, aux: bool) -> DrafterHost:
        torch.set_num_threads(cfg.threads())
        # The target's weights are never run here: drafters need its tokenizer, identity and vocabulary size.
        target = load_tokenizer(cfg.model, device_type=cfg.verifier_device_type(), dtype=cfg.dtype)
        draft = load_model(cfg.draft_model, device=cfg.device, dtype=cfg.dtype) if aux and cfg.draft_model else None
        methods = cfg.aux_methods if aux else cfg.trigram_methods
        return DrafterHost(build_drafters(cfg, methods, target, draft), max_sessions=cfg.drafter_sessions,
                           vocab_size=target.vocab_size)

    async def _call(self, fn, *args):
        """``fn(*args)`` on the torch thread (a draft model's pool), else inline."""
        if self._torch is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    def info(self) -> dict[str, int]:
        return self.host.info()

    async def step_batch(self, payload: bytes) -> bytes:
        """One DraftBatchRequest -> DraftBatchResponse (serialized: the contract, and cheap to move)."""
        batch = pb.DraftBatchRequest.FromString(payload)
        reply = await self._call(self.host.step_batch, batch)
        for req, result in zip(batch.steps, reply.results):
            if result.response.rebuilt and req.prompt_len < len(req.context):
                self.metrics.rebuilds.inc()
        return reply.SerializeToString()

    async def finish(self, request_id: str) -> None:
        await self._call(self.host.finish, request_id)  # a draft model's slot is freed with tensor ops

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self.host.sessions), "rebuilds": self.host.rebuilds}
