"""The Serve application builder: ``build_app(args)`` turns a ServeConfig (as a dict) into the app.

``serve run deploy.app:build_app`` and the rendered config (``specd serve --print-serve-config``) both
land here, so the local server, ``serve run`` and KubeRay's serveConfigV2 build the same graph.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from deploy.config import ServeConfig
from deploy.ingress import Ingress
from deploy.pool import DrafterPool
from deploy.verifier import VerifierServer


def build_app(args: dict) -> Application:
    cfg = ServeConfig.model_validate(args)
    conf = cfg.model_dump(mode="json")  # plain data: what replicas receive
    trigram = aux = None
    if cfg.trigram_placement == "remote":
        trigram = _deployment(DrafterPool, "TrigramDrafter", cfg).bind(conf, "trigram")
    if cfg.draft_model and cfg.aux_placement == "remote":
        aux = _deployment(DrafterPool, "AuxDrafter", cfg).bind(conf, "aux")
    verifier = _deployment(VerifierServer, "Verifier", cfg).bind(conf, trigram, aux)
    return _deployment(Ingress, "Ingress", cfg).bind(conf, verifier)


def _deployment(cls, name: str, cfg: ServeConfig):
    return serve.deployment(cls, name=name).options(**cfg.serve_options(name))
