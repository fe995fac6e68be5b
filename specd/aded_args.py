"""ADED's search flags, shared by `specd generate`, `specd bench` and `specd serve`.

They become ``AdedConfig`` fields (``actors.methods.aded_config``): ``--aded-search mcts --aded-simulations
64`` is ``{search: mcts, mcts: {simulations: 64}}``, the same as ``drafter_options: {aded: ...}`` in a serve
config. A flag that does not apply (MCTS settings with best-first, any of them with another method) is an
error, never ignored.
"""

from __future__ import annotations

import argparse
from typing import Any

SEARCHES = ("best_first", "mcts", "none")
VALUES = ("rollout", "path")
FLAGS = ("aded_search", "aded_simulations", "aded_depth", "aded_value")


def add_aded_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ADED search (method aded)")
    g.add_argument("--aded-search", choices=SEARCHES, default=None,
                   help="n-gram tree search: best_first (default), mcts (ADED's PUCT search) or none")
    g.add_argument("--aded-simulations", type=int, default=None, metavar="N", help="MCTS simulations per step (150)")
    g.add_argument("--aded-depth", type=int, default=None, metavar="N",
                   help="deepest tree node below the pending token (best_first 8, mcts 3)")
    g.add_argument("--aded-value", choices=VALUES, default=None,
                   help="MCTS backed-up value: rollout (ADED's) or path (expected accepted length)")


def aded_options_from_args(args: argparse.Namespace, method: str | None = "aded",
                           base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``AdedConfig`` fields from the flags, on top of ``base`` (a config file's); {} when none is given.

    ValueError (one line) when a flag does not apply to ``method`` or to the chosen search.
    """
    given = [f for f in FLAGS if getattr(args, f, None) is not None]
    if not given:
        return dict(base or {})
    if method != "aded":
        raise ValueError(f"--{given[0].replace('_', '-')} applies to --method aded only")
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    search = args.aded_search or out.get("search", "best_first")
    out["search"] = search
    mcts_only = [f for f in ("aded_simulations", "aded_value") if getattr(args, f) is not None]
    if mcts_only and search != "mcts":
        raise ValueError(f"--{mcts_only[0].replace('_', '-')} needs --aded-search mcts (search is {search})")
    if search == "mcts":
        m = out.setdefault("mcts", {})
        for flag, key in (("aded_simulations", "simulations"), ("aded_depth", "max_depth"), ("aded_value", "value")):
            if getattr(args, flag) is not None:
                m[key] = getattr(args, flag)
    elif args.aded_depth is not None:
        if search != "best_first":
            raise ValueError("--aded-depth needs --aded-search best_first or mcts")
        out.setdefault("best_first", {})["max_depth"] = args.aded_depth
    return out


def reject_remote(args: argparse.Namespace) -> None:
    """`specd generate --server`: the search is the server's setting, not a request's."""
    given = [f for f in FLAGS if getattr(args, f, None) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is a server setting: start `specd serve` with it "
                         "(or drafter_options: {aded: ...} in its config)")


def serve_drafter_options(args: argparse.Namespace) -> dict[str, Any]:
    """``load_config`` overrides for `specd serve`: ``drafter_options`` with the flags merged into the
    config file's aded options; nothing when no flag is given."""
    if not any(getattr(args, f, None) is not None for f in FLAGS):
        return {}
    from deploy.config import load_config

    options = dict(load_config(args.config).drafter_options)
    options["aded"] = aded_options_from_args(args, "aded", options.get("aded"))
    return {"drafter_options": options}
