"""A verifier replica as a tensor-parallel group of Ray actors (``tp_size > 1``).

The replica is rank 0: it runs the engine with the ``deepspeed`` backend (actors.tp). Its placement group
(Serve's ``placement_group_bundles``, STRICT_PACK: one node, one bundle per rank) has a bundle for each
follower; :meth:`TPGroup.start` places one :class:`TPFollower` actor in each and all ranks join one
process group (gloo on CPU, NCCL on GPUs) at rank 0's node address. Followers are owned by the replica,
so they die with it; a dead follower breaks the group: in-flight requests raise (a failed collective,
bounded by the group's timeout) and :meth:`TPGroup.check` fails the replica's health check, so Serve
replaces the whole group.
"""

from __future__ import annotations

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.engine import Engine, EngineConfig
from actors.models import LoadedModel, load_model
from actors.process import free_port
from actors.tp import TPGroupError, follow, init_group
from deploy.config import ServeConfig


@ray.remote
class TPFollower:
    """Rank ``rank`` >= 1 of one verifier replica's group: its shard and KV caches, replaying rank 0's ops."""

    def __init__(self, config: dict, rank: int) -> None:
        self.cfg = ServeConfig.model_validate(config)
        self.rank = rank
        torch.set_num_threads(self.cfg.threads())

    def run(self, addr: str, port: int) -> int:
        """Join the group, shard the target with rank 0, follow until rank 0 says stop; returns the rank."""
        cfg = self.cfg
        init_group(self.rank, cfg.tp_size, addr, port, cfg.tp_timeout_s, device=0)  # Ray shows each actor its GPU as 0
        follow(load_model(cfg.model).model, cfg.tp_size)
        return self.rank


class TPGroup:
    """Rank 0's view of its followers: start them, join the group, build the engine, watch their health."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.followers: list = []
        self.runs: list[ray.ObjectRef] = []  # each follower's run(): ready only when it ended (stop or death)

    def start(self, target: LoadedModel, engine_config: EngineConfig) -> Engine:
        """Blocking: spawn followers into this replica's placement group and build the sharded engine."""
        cfg, pg = self.cfg, ray.util.get_current_placement_group()
        if pg is None:
            raise TPGroupError("tp_size > 1 needs the replica's placement group (ServeConfig.serve_options sets it)")
        opts = cfg.verifier.serve_options()["ray_actor_options"]
        conf = cfg.model_dump(mode="json")
        self.followers = [
            TPFollower.options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank)).remote(conf, rank)
            for rank in range(1, cfg.tp_size)
        ]
        addr = ray.util.get_node_ip_address()
        port = free_port(addr)
        self.runs = [f.run.remote(addr, port) for f in self.followers]
        init_group(0, cfg.tp_size, addr, port, cfg.tp_timeout_s, device=0)  # waits for the followers (timeout)
        self.check()
        return Engine(target, engine_config)

    def check(self, engine: Engine | None = None) -> None:
        """Raise if any follower's run ended or a collective failed: the group cannot serve any more."""
        error = getattr(engine.verifier, "error", None) if engine is not None else None
        if error is not None:
            raise TPGroupError(f"tensor-parallel group is broken: {error}")
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        if done:
            try:
                ray.get(done, timeout=self.cfg.tp_timeout_s)
            except Exception as e:  # noqa: BLE001 - the follower's own error, reported as the cause
                raise TPGroupError(f"a tensor-parallel follower failed: {e}") from e
            raise TPGroupError("a tensor-parallel follower stopped")
