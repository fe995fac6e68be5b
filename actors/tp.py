"""The ``deepspeed`` verifier backend: the target sharded by DeepSpeed AutoTP over a tensor-parallel group.

Every rank holds a shard of every layer (``deepspeed.init_inference`` with ``tensor_parallel``; the
attention heads and MLP columns are split, ``o_proj``/``down_proj`` all-reduce) and its own KV cache
of its own heads. Rank 0 runs the normal :class:`~actors.engine.Engine`; its verifier is a
:class:`LeaderVerifier`, which broadcasts a small op record before every forward (``start``,
``verify``) so the follower ranks, looping in :func:`follow`, replay the identical call on their shard
and their own :class:`~actors.verifier.TargetSequence`: the forwards' all-reduces then meet. Cache-only
ops (``commit``, ``finish``) need no collective of their own: they ride along with the next broadcast.
Tree verification, KV commit/rollback and every decoding method therefore run unchanged.

Failure is bounded, never a hang: every collective runs under the process group's timeout, a broken
collective marks the group broken (later calls raise at once), and an idle leader sends a heartbeat so
followers waiting for work never hit the timeout themselves.

Process groups: NCCL when CUDA is available, else gloo. On CPU DeepSpeed's shared-memory all-reduce
must be turned off before ``init_distributed`` (it segfaults here); TP on CPU is a correctness check,
slower than one process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from actors.draft import Draft
from actors.process import free_port
from actors.verifier import TargetSequence, Verifier

Op = tuple  # ("start", key, prompt, prefill) | ("prefill", key, max_tokens) | ("verify", [(key, tokens, parents), ...])
#             | ("commit", key, nodes, tokens)
#             | ("finish", key) | ("ping",) | ("stop",)


class TPGroupError(RuntimeError):
    """The tensor-parallel group is broken (a rank died or a collective timed out)."""


def _deepspeed():
    """deepspeed, imported so that its log handler (bound at import) and its prints go to stderr, not stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
    return deepspeed


def init_group(rank: int, world_size: int, addr: str, port: int, timeout_s: float = 60.0, device: int | None = None) -> None:
    """Join the TP group (every rank calls this once per process): NCCL on CUDA, gloo on CPU.

    ``device``: the CUDA device of this rank (default ``rank``; 0 where each process sees one GPU).
    """
    deepspeed = _deepspeed()
    cuda = torch.cuda.is_available()
    local = rank if device is None else device
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(local if cuda else rank))
    if cuda:
        torch.cuda.set_device(local)
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # its all-reduce segfaults on CPU
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world_size)


def shard(model: PreTrainedModel, tp_size: int) -> PreTrainedModel:
    """The model with its layers sharded over the ``tp_size`` ranks (collective: every rank calls it)."""
    deepspeed = _deepspeed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != tp_size:
        raise TPGroupError(f"tp_size {tp_size} needs a process group of {tp_size} ranks (actors.tp.init_group "
                           f"on every rank first); this one has {world}")
    with contextlib.redirect_stdout(sys.stderr):  # AutoTP prints its sharding plan
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=model.dtype,
                                          replace_with_kernel_inject=False)
    return engine.module.eval()


def _broadcast(ops: list[Op] | None) -> list[Op]:
    box = [ops]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _replay(verifier: Verifier, seqs: dict[int, TargetSequence], ops: list[Op]) -> bool:
    """Apply rank 0's ops to this rank's shard; False on ``stop``."""
    for op in ops:
        kind = op[0]
        if kind == "start":
            seqs[op[1]] = verifier.start(op[2], prefill=op[3])
        elif kind == "prefill":
            verifier.prefill(seqs[op[1]], op[2])
        elif kind == "verify":
            verifier.verify([(seqs[key], Draft(tokens, parents)) for key, tokens, parents in op[1]])
        elif kind == "commit":
            verifier.commit(seqs[op[1]], op[2], op[3])
        elif kind == "finish":
            verifier.finish(seqs.pop(op[1]))
        elif kind == "stop":
            return False
    return True


def follow(model: PreTrainedModel, tp_size: int) -> None:
    """A follower rank: shard ``model`` (with rank 0) and replay rank 0's verifier ops until ``stop``.

    Raises (and so ends the process's part in the group) when a collective fails: rank 0 is gone.
    """
    verifier, seqs = Verifier(shard(model, tp_size)), {}
    while _replay(verifier, seqs, _broadcast(None)):
        pass


class LeaderVerifier(Verifier):
    """Rank 0's verifier: the plain one on its shard, with every op mirrored to the followers first.

    Thread-safe: concurrent requests take one lock per op, so all ranks see the same op order.
    """

    def __init__(self, model: PreTrainedModel, tp_size: int, heartbeat_s: float = 10.0) -> None:
        super().__init__(shard(model, tp_size))
        self.tp_size = tp_size
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending: list[Op] = []  # cache-only ops, sent with the next broadcast
        self._keys = 0
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="tp-heartbeat")
        self._heartbeat.start()

    def start(self, prompt_ids: Sequence[int], prefill: bool = True) -> TargetSequence:
        prompt = self.check_prompt(prompt_ids)
        with self._lock:
            self._keys += 1
            self._send(("start", self._keys, prompt, prefill))
            seq = self._guard(super().start, prompt, prefill)
            seq.key = self._keys
            return seq

    def prefill(self, seq: TargetSequence, max_tokens: int | None = None) -> int:
        with self._lock:
            self._send(("prefill", seq.key, max_tokens))
            return self._guard(super().prefill, seq, max_tokens)

    def verify(self, batch: Sequence[tuple[TargetSequence, Draft]]) -> list[torch.Tensor]:
        for seq, draft in batch:
            self.check_draft(seq, draft)
        with self._lock:
            self._send(("verify", [(s.key, d.tokens.tolist(), d.parents.tolist()) for s, d in batch]))
            return self._guard(super().verify, batch)

    def commit(self, seq: TargetSequence, accepted_nodes: list[int], new_tokens: list[int]) -> None:
        with self._lock:
            self._pending.append(("commit", seq.key, list(accepted_nodes), list(new_tokens)))
            super().commit(seq, accepted_nodes, new_tokens)

    def finish(self, seq: TargetSequence) -> None:
        with self._lock:  # frees the slot here and, in the same op order, on every follower
            self._pending.append(("finish", seq.key))
            super().finish(seq)

    def close(self) -> None:
        """Stop the followers (their :func:`follow` returns); the group stays initialised."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            if self.error is None:
                self._send(("stop",))

    def _send(self, op: Op) -> None:
        ops, self._pending = [*self._pending, op], []
        self._guard(_broadcast, ops)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a collective; any failure breaks the group for good (the ranks' states may have diverged)."""
        if self.error is not None:
            raise TPGroupError(f"tensor-parallel group is broken: {self.error}")
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - a rank died, timed out, or replay diverged
            self.error = e
            raise TPGroupError(f"tensor-parallel group failed: {e}") from e
        self._last = time.monotonic()
        return out

    def _beat(self, every_s: float) -> None:
        """Keep idle followers inside their collective timeout; also surfaces a dead follower early."""
        while not self._closed.wait(every_s / 2):
            if time.monotonic() - self._last < every_s or self.error is not None:
                continue
            with self._lock:
                if not self._closed.is_set():
                    try:
                        self._send(("ping",))
                    except TPGroupError:
                        return


def deepspeed_verifier(model: PreTrainedModel, tp_size: int, heartbeat_s: float = 10.0) -> Verifier:
    """The DeepSpeed backend's verifier: tp_size 1 runs in this process alone; more makes it the group's leader."""
    if tp_size == 1:
        return Verifier(shard(model, 1))
    if dist.is_initialized() and dist.get_rank() != 0:
        raise TPGroupError("only rank 0 runs the engine; other ranks call actors.tp.follow")
    return LeaderVerifier(model, tp_size, heartbeat_s)


def launch_local(fn: Callable[..., None], tp_size: int, *args: Any, timeout_s: float = 60.0) -> None:
    """Run ``fn(rank, *args)`` in ``tp_size`` fresh local processes joined in one TP group; wait for all.

    ``fn`` must be importable (a module-level function). Raises if any rank fails.
    """
    import torch.multiprocessing as mp

    port = free_port("127.0.0.1")
    mp.start_processes(_local_rank, args=(tp_size, port, timeout_s, fn, args), nprocs=tp_size,
                       join=True, start_method="spawn")


def _local_rank(rank: int, tp_size: int, port: int, timeout_s: float, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // tp_size))
    init_group(rank, tp_size, "127.0.0.1", port, timeout_s)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
