"""A local Ray + Serve for `specd serve`, the tests and the benchmark, sized for a small shared machine:
fractional CPUs, a capped object store, the pools as custom resources, no dashboard or usage stats."""

from __future__ import annotations

import os
import tempfile

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from deploy.app import build_app
from deploy.config import GRPC_SERVICERS, ServeConfig

# Read by Ray's processes at start: set before ray.init so the raylet and every replica inherit them.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1",  # the default floods logs on 2 busy cores
    "RAY_AUTH_MODE": "disabled",
}


def start(cfg: ServeConfig, *, num_cpus: float = 2, extra_resources: dict[str, float] | None = None,
          object_store_mb: int = 256, temp_dir: str | None = None, metrics_port: int | None = None) -> None:
    """Start Ray with the pools ``cfg`` needs (plus ``extra_resources``) and Serve with both proxies.

    ``metrics_port``: where this node's Prometheus endpoint serves the ``specd_*`` metrics (Ray prefixes
    them ``ray_``); None lets Ray pick.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    resources = cfg.pool_sizes()
    for name, amount in (extra_resources or {}).items():
        resources[name] = resources.get(name, 0) + amount
    ray.init(num_cpus=num_cpus, resources=resources, object_store_memory=object_store_mb << 20,
             _temp_dir=temp_dir or tempfile.mkdtemp(prefix="specd-ray-", dir="/tmp"),
             _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             log_to_driver=False, **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port},
                grpc_options=gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS)))


def deploy(cfg: ServeConfig):
    """Run the app built from ``cfg`` and wait until it is RUNNING; returns the ingress handle."""
    return serve.run(build_app(cfg.model_dump(mode="json")), name=cfg.name, route_prefix=cfg.route_prefix)


def stop() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
