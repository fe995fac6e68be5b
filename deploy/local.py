"""A local Ray + Serve for `specd serve`, the tests and the benchmark, sized for a small shared machine:
fractional CPUs, a capped object store, the pools as custom resources, no dashboard or usage stats.
``prepare`` does the slow one-time work (model conversion, the tri-gram matrix) in the caller's process first."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Iterable

import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

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
    # The gRPC proxy's receive bound (Ray's default is 2 GiB): read by the proxy process at its start.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(cfg.limits.max_message_bytes))
    resources = cfg.pool_sizes()
    for name, amount in (extra_resources or {}).items():
        resources[name] = resources.get(name, 0) + amount
    ray.init(num_cpus=num_cpus, resources=resources, object_store_memory=object_store_mb << 20,
             _temp_dir=temp_dir or tempfile.mkdtemp(prefix="specd-ray-", dir="/tmp"),
             _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             log_to_driver=False, **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port},
                grpc_options=gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS)))


# Only for something really stuck (a replica that never starts): on 2 busy cores an app with four
# model-loading deployments took over a minute, so Ray's own 60 s bound on a declarative deploy is not used.
DEPLOY_TIMEOUT_S = float(os.environ.get("SPECD_DEPLOY_TIMEOUT_S", 900))


class DeployError(RuntimeError):
    """An application went DEPLOY_FAILED, vanished, or stayed not RUNNING past the bound."""


def deploy(cfg: ServeConfig, timeout_s: float | None = None):
    """Run the app built from ``cfg`` and wait until it is RUNNING; returns the ingress handle."""
    handle = serve._run(build_app(cfg.model_dump(mode="json")), name=cfg.name, route_prefix=cfg.route_prefix,
                        _blocking=False)
    wait_running([cfg.name], timeout_s)
    return handle


def deploy_config(config: dict[str, Any], timeout_s: float | None = None) -> None:
    """Apply a plain Serve config (what render_serve_config gives, KubeRay's path) and wait for its apps."""
    schema = ServeDeploySchema.model_validate(config)
    serve.context._get_global_client().deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], timeout_s)


def wait_running(names: Iterable[str], timeout_s: float | None = None, poll_s: float = 1.0) -> None:
    """Poll Serve until every app in ``names`` is RUNNING; DeployError at once on DEPLOY_FAILED.

    The bound (``DEPLOY_TIMEOUT_S`` unless given) is there for a stuck deploy, not for a slow machine.
    """
    names = list(names)
    deadline = time.monotonic() + (DEPLOY_TIMEOUT_S if timeout_s is None else timeout_s)
    while True:
        apps = serve.status().applications
        for name in names:
            app = apps.get(name)
            if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
                why = "; ".join(f"{d}: {dep.message}" for d, dep in app.deployments.items() if dep.message)
                raise DeployError(f"application {name!r} failed to deploy: {app.message} {why}".strip())
        pending = {n: (apps[n].status if n in apps else "absent") for n in names
                   if n not in apps or apps[n].status != ApplicationStatus.RUNNING}
        if not pending:
            # What Serve's own blocking deploy ends with: the proxies route to the new apps.
            serve.context._get_global_client().wait_for_proxies_serving(wait_for_applications_running=True)
            return
        if time.monotonic() > deadline:
            raise DeployError(f"applications not RUNNING after {timeout_s or DEPLOY_TIMEOUT_S:.0f} s: {pending}")
        time.sleep(poll_s)


def stop() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def prepare(cfg: ServeConfig, say: Callable[[str], None]) -> None:
    """Convert the models and build the tri-gram matrix here, in the foreground with progress, before any
    replica starts: a replica's output is hidden, and a first start would otherwise sit silent for minutes.

    A model that needs an explicit ``specd models fetch`` (GBs to convert) is refused here with that
    advice, as its replica would refuse it unseen.
    """
    from actors.model_cache import REGISTRY, ModelError, fetch_model, is_cached
    from actors.models import load_model

    for name in filter(None, (cfg.model, cfg.draft_model)):
        source = REGISTRY.get(name)
        if source is None or source.gguf is None or is_cached(name):
            continue  # built in code, a local path, or converted already
        if source.explicit_fetch:
            raise ModelError(f"{name} is not in the cache; fetch it once with `specd models fetch {name}` "
                             f"(downloads and converts ~{source.gguf.size / 1e9:.1f} GB)")
        say(f"preparing {name} (one time: download and convert)…")
        fetch_model(name)
    if "aded" in cfg.trigram_methods:
        from actors.aded.corpus import default_matrix_path
        from actors.methods import ensure_default_matrix

        target = load_model(cfg.model, kernels="torch")  # the tokenizer is what counts; no kernel copies
        if not default_matrix_path(target.identity).exists():
            ensure_default_matrix(target)  # says what it builds; tqdm bars for the corpus and the counts
        del target


def describe(cfg: ServeConfig, num_cpus: float) -> str:
    """One line saying what ``start`` + ``deploy`` bring up."""
    parts = []
    for name, opts in cfg.deployments.items():
        scale = opts.autoscaling_config
        replicas = (f"{scale.get('min_replicas', 1)}-{scale.get('max_replicas', 1)}" if scale
                    else str(opts.num_replicas))
        pool = "/".join(sorted(opts.resources)) or "no pool"
        parts.append(f"{name} x{replicas} ({pool})")
    placement = f"tri-gram drafter {cfg.trigram_placement}" + (f", draft model {cfg.aux_placement}"
                                                               if cfg.draft_model else "")
    return (f"starting Ray ({num_cpus:g} CPUs) and Serve: {', '.join(parts)}; {placement}; "
            f"gRPC {cfg.http_host}:{cfg.grpc_port}, HTTP {cfg.http_host}:{cfg.http_port}…")
