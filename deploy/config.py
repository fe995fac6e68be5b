"""The serving configuration: one validated object from which both the local app and the plain
``serve run`` / KubeRay ``serveConfigV2`` config are rendered (one source of truth).

Pools are Ray resources: each drafter replica asks for ``draft_pool`` and each verifier replica for
``verify_pool`` (custom resources locally; in production the same names label GPU worker groups, and
``num_gpus`` is set per deployment).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.engine_config import EngineConfig
from actors.models import DEFAULT_MODEL
from deploy.request import RequestLimits

APP_IMPORT_PATH = "deploy.app:build_app"
GRPC_SERVICERS = (
    "deploy.grpc_service.add_SpecdServicer_to_server",  # the generated one, parsing bad bytes into an error
    # The standard health service through Serve's gRPC proxy: with a single application no
    # `application` metadata is needed, so Kubernetes gRPC probes and load balancers can call it.
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
DRAFT_POOL, VERIFY_POOL = "draft_pool", "verify_pool"


class DeploymentOptions(BaseModel):
    """Placement and scaling of one deployment (rendered into Serve's deployment options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1, description="Fixed replica count; ignored when autoscaling_config is set.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve AutoscalingConfig (min_replicas, max_replicas, target_ongoing_requests, ...).")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Concurrent requests one replica accepts; None = the deployment's default (a "
        "verifier: twice its max_batch).")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica (fractional: this is a scheduling hint).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (production pools).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica (the pool).")

    @field_validator("autoscaling_config")
    @classmethod
    def _valid_autoscaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from ray.serve.config import AutoscalingConfig

            fields = getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__
            unknown = sorted(set(v) - set(fields))
            if unknown:  # Serve ignores unknown keys: a typo would silently keep the defaults
                raise ValueError(f"unknown autoscaling_config keys {unknown}")
            AutoscalingConfig(**v)  # raises on inconsistent bounds
        return v

    def serve_options(self) -> dict[str, Any]:
        """Keyword options for ``Deployment.options`` and the serve config's ``deployments`` entries."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  "resources": dict(self.resources)},
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ServeConfig(BaseModel):
    """Everything `specd serve` and `serve run` need; the app builder takes exactly this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("specd", description="Serve application name (also the gRPC `application` metadata value).")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP route prefix of the app (one app per prefix).")
    model: str = Field(DEFAULT_MODEL, description="Target model name or path (actors.models.load_model).")
    draft_model: str | None = Field(None, description="Auxiliary draft model for sd/mtad/mmtad (same tokenizer).")
    default_method: str = Field("aded", description="Method for requests that name none; 'ar' if it cannot run.")
    trigram_methods: tuple[str, ...] = Field(("aded",), description="Model-free methods served by the tri-gram pool.")
    aux_methods: tuple[str, ...] = Field(("sd", "mtad", "mmtad"), description="Methods served by the auxiliary pool.")
    trigram_placement: Literal["remote", "colocated"] = Field(
        "remote", description="Tri-gram drafter in its own deployment on the draft pool, or inside each verifier.")
    aux_placement: Literal["remote", "colocated"] = Field(
        "remote", description="Auxiliary draft model in its own deployment on the draft pool, or inside each verifier.")
    drafter_affinity: bool = Field(
        True, description="Route all draft steps of a verifier replica's requests to one drafter replica (a "
        "step's requests travel in one call; deploy.routing).")
    drafter_sessions: int = Field(
        256, ge=1, description="Request states a drafter replica keeps (LRU beyond: a bound for states whose "
        "finish never arrived). Keep it above max_batch x the verifier replicas one drafter replica serves.")
    drafter_timeout_s: float = Field(
        3.0, gt=0, description="Bound on one remote draft step: past it (or on any failure of the call) the "
        "step is a plain one and the request goes on.")
    drafter_retry_s: float = Field(
        2.0, ge=0, description="After a failed remote draft step, how long steps skip that drafter pool "
        "(plain steps at once) before trying it again.")
    drafter_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-method server options (actors.methods.check_options): aded takes "
        "AdedConfig's fields, e.g. {aded: {search: mcts, mcts: {simulations: 64}}}; sd gamma; mtad/mmtad gamma, "
        "beam_width, tau. Unknown keys are an error.")
    store_prompts: bool = Field(
        True, description="Fold each prompt's tri-grams into the adaptive store. The store is shared by every "
        "request of a replica (of the fleet with Redis), so what one tenant sends shapes the drafts of others and "
        "a request's accepted counts hint whether its text matched theirs; False keeps prompts out (outputs "
        "and the target's top-k still go in). See README 'What a shared store reveals'.")
    redis_url: str | None = Field(None, description="Shared n-gram store; None = in-memory store per process.")
    redis_url_env: str | None = Field(
        None, description="Environment variable holding the Redis URL (a Kubernetes Secret); wins over redis_url.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Bounds on every size a request sets.")
    max_draft_tokens: int = Field(64, ge=0, le=1024, description="Engine cap on draft nodes verified per step.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per model replica; None = every CPU this process may use. "
        "A batch's draft and verify run one after the other, so the verifier's forward has the cores to itself: "
        "at 8 concurrent requests on 2 cores, 2 threads served 1.26x the tokens/s of 1 (ar, MT-Bench; "
        "results/2026-12-02-served-threads/).")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the verifier's target and the auxiliary draft model run: auto = the replica's GPU when "
        "Ray gives it one, else CPU. The tri-gram pool keeps its tokenizer-only target copy on the CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations of the target and the auxiliary draft model: auto = bfloat16 "
        "on a GPU, float32 on a CPU. Lossless methods are exact relative to the model as served in this dtype.")
    max_batch: int = Field(16, ge=1, le=1024, description="Requests one verifier replica decodes together (its "
                           "batch slots); more wait in the replica's queue. Sets the verifier's default "
                           "max_ongoing_requests (2x: one batch decoding, one waiting) and autoscaling target.")
    prefill_chunk: int = Field(256, ge=1, description="Prompt tokens a verifier prefills per step: bounds how long a "
                               "joining request stalls the running batch.")
    draft_gate: bool = Field(True, description="Hold back a greedy request's drafting while its own time outweighs "
                             "the tokens it adds (EngineConfig.draft_gate); false drafts every step.")
    budget_timing: bool = Field(True, description="Correct the verify-cost curve per step shape from the steps the "
                                "replica times (EngineConfig.budget_timing); false reads the profile as measured.")
    batch_invariant: bool = Field(True, description="Greedy output independent of the batch (EngineConfig."
                                  "batch_invariant): false trades that guarantee for one attention call per layer "
                                  "over the whole batch. Only with tp_size 1.")
    tp_size: int = Field(
        1, ge=1, description="Tensor-parallel ranks per verifier replica (DeepSpeed AutoTP): a replica is then a "
        "group of tp_size actors packed on one node, each holding the verifier's resources (a GPU in production).")
    tp_timeout_s: float = Field(
        60.0, gt=0, description="Bound on one tensor-parallel collective: a dead or stuck rank fails requests "
        "after at most this long instead of hanging them.")

    def verifier_device_type(self) -> str:
        """Where the verifier runs the target: ``device``, with auto resolved from the verify pool's GPUs."""
        if self.device != "auto":
            return self.device.partition(":")[0]
        return "cuda" if self.verifier.num_gpus > 0 else "cpu"

    @model_validator(mode="after")
    def _engine_config_valid(self) -> ServeConfig:
        self.engine_config()  # a combination the engine refuses fails here, not at a replica's start
        return self

    @field_validator("drafter_options")
    @classmethod
    def _known_drafter_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from actors.methods import check_options

        for method, options in v.items():
            check_options(method, options)
        return v

    def engine_config(self) -> EngineConfig:
        """The verifier replica's engine: plain, or the deepspeed backend over tp_size ranks."""
        return EngineConfig(max_draft_tokens=self.max_draft_tokens, max_batch=self.max_batch,
                            prefill_chunk=self.prefill_chunk, draft_gate=self.draft_gate,
                            budget_timing=self.budget_timing, batch_invariant=self.batch_invariant,
                            backend="deepspeed" if self.tp_size > 1 else "plain", tp_size=self.tp_size,
                            tp_heartbeat_s=self.tp_timeout_s / 4)
    http_host: str = Field("127.0.0.1", description="HTTP proxy bind address (0.0.0.0 in a cluster).")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP proxy port (OpenAI API, /health, /metrics-free).")
    grpc_port: int = Field(9000, ge=0, le=65535, description="gRPC proxy port (specd.v1.Specd, grpc.health.v1).")
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.05, max_ongoing_requests=64),
        description="The ingress (gRPC servicer + OpenAI HTTP): light, model-free.")
    verifier: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.5, resources={VERIFY_POOL: 1}),
        description="The target model and decode loop; a request stays on one replica (its KV cache).")
    trigram_drafter: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.1, max_ongoing_requests=64, resources={DRAFT_POOL: 1}),
        description="Tri-gram (ADED) drafter replicas on the draft pool.")
    aux_drafter: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.2, max_ongoing_requests=32, resources={DRAFT_POOL: 1}),
        description="Auxiliary draft-model replicas on the draft pool (only when draft_model is set).")

    @property
    def deployments(self) -> dict[str, DeploymentOptions]:
        """Deployment name -> options, for the deployments this config actually runs."""
        out = {"Ingress": self.ingress, "Verifier": self.verifier}
        if self.trigram_placement == "remote":
            out["TrigramDrafter"] = self.trigram_drafter
        if self.draft_model and self.aux_placement == "remote":
            out["AuxDrafter"] = self.aux_drafter
        return out

    def threads(self) -> int:
        """``torch_threads`` resolved in the process that runs the model."""
        return self.torch_threads or len(os.sched_getaffinity(0))

    def serve_options(self, name: str) -> dict[str, Any]:
        """Serve options of deployment ``name``: its DeploymentOptions plus, for drafter pools, the router."""
        opts = self.deployments[name].serve_options()
        if name == "Verifier":  # capacity follows the batch: one batch decoding, one queued behind it
            if opts["max_ongoing_requests"] is None:
                opts["max_ongoing_requests"] = 2 * self.max_batch
            if "autoscaling_config" in opts:
                opts["autoscaling_config"].setdefault("target_ongoing_requests", self.max_batch)
        elif opts["max_ongoing_requests"] is None:
            opts["max_ongoing_requests"] = 16
        if name == "Verifier" and self.tp_size > 1:
            # One bundle per rank; the replica itself (rank 0) takes the first, its followers the rest.
            actor = opts["ray_actor_options"]
            bundle = {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], **actor["resources"]}
            opts["placement_group_bundles"] = [{k: v for k, v in bundle.items() if v}] * self.tp_size
            opts["placement_group_strategy"] = "STRICT_PACK"
        if name in ("TrigramDrafter", "AuxDrafter") and self.drafter_affinity:
            from deploy.routing import ROUTER_CLASS

            opts["request_router_config"] = {"request_router_class": ROUTER_CLASS}
        return opts

    def pool_sizes(self) -> dict[str, float]:
        """Custom resources the deployments ask for at their largest scale (what a local node must offer)."""
        need: dict[str, float] = {}
        for deployment, opts in self.deployments.items():
            replicas = (opts.autoscaling_config or {}).get("max_replicas", opts.num_replicas)
            replicas *= self.tp_size if deployment == "Verifier" else 1
            for name, amount in opts.resources.items():
                need[name] = need.get(name, 0) + amount * replicas
        return need


def load_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """A YAML/JSON config file (or the defaults), with non-None ``overrides`` on top."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig.model_validate(data)


def render_serve_config(cfg: ServeConfig) -> dict[str, Any]:
    """The plain Serve config (`serve run`, KubeRay `serveConfigV2`) for ``cfg``; validates with ServeDeploySchema."""
    deployments = [{"name": name, **cfg.serve_options(name)} for name in cfg.deployments]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http_host, "port": cfg.http_port},
        "grpc_options": {"port": cfg.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICERS)},
        "applications": [{
            "name": cfg.name,
            "route_prefix": cfg.route_prefix,
            "import_path": APP_IMPORT_PATH,
            "args": cfg.model_dump(mode="json"),
            "deployments": deployments,
        }],
    }
