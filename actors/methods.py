"""Decoding methods by name: each maps to a drafter built once per process and shared by requests."""

from __future__ import annotations

from typing import NamedTuple

from actors.drafter import Drafter, NoDrafter
from actors.models import LoadedModel


class MethodUnavailable(ValueError):
    """The method exists but cannot run with what was given (or is not built yet)."""


class MethodSpec(NamedTuple):
    lossless: bool  # exact: the target's distribution (greedy: its greedy output); False = approximate by design
    description: str  # one line, shown by ListModels


#: name -> MethodSpec(lossless, description); ``describe`` adds what a configured drafter runs.
METHODS: dict[str, MethodSpec] = {name: MethodSpec(*spec) for name, spec in {
    "ar": (True, "plain autoregressive decoding (the baseline)"),
    "sd": (True, "standard speculative decoding with an auxiliary draft model (lossless)"),
    "aded": (True, "ADED: adaptive tri-gram matrix + context matching + the target's recycled top-k, draft "
                   "trees searched best-first or by MCTS, no draft model (lossless)"),
    "mtad": (False, "MTAD: auxiliary-model multi-token joint decoding (APPROXIMATE by design)"),
    "mmtad": (False, "MMTAD: MTAD keeping all beams as a draft tree (APPROXIMATE by design)"),
}.items()}


#: Server-side options each method takes (``ServeConfig.drafter_options``, ``make_drafter``): anything
#: else is an error, never dropped. ADED takes ``AdedConfig``'s fields (checked by ``aded_config``).
OPTIONS: dict[str, frozenset[str]] = {
    "ar": frozenset(), "sd": frozenset({"gamma"}), "mtad": frozenset({"gamma", "beam_width", "tau"}),
    "mmtad": frozenset({"gamma", "beam_width", "tau"}),
}


def check_options(method: str, options: dict) -> None:
    """Raise ValueError (one line) if ``options`` are not what ``method`` takes."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "aded":
        aded_config(options)
        return
    unknown = sorted(set(options) - OPTIONS[method])
    if unknown:
        takes = ", ".join(sorted(OPTIONS[method])) or "no options"
        raise ValueError(f"method {method!r} does not take {unknown}; it takes {takes}")


def aded_config(options: dict | None):
    """``AdedConfig`` from server options (its fields, e.g. ``{search: mcts, mcts: {simulations: 64}}``);
    ValueError naming the offending key otherwise."""
    from pydantic import ValidationError

    from actors.aded import AdedConfig

    try:
        return AdedConfig.model_validate(options or {})
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"aded options: {errors} (the keys are AdedConfig's: "
                         f"{', '.join(AdedConfig.model_fields)})") from None


def describe(method: str, options: dict | None = None) -> str:
    """``METHODS``' description plus, for ADED, the search the given options make it run."""
    text = METHODS[method].description
    if method != "aded":
        return text
    c = aded_config(options)
    if c.search == "mcts":
        m = c.mcts
        how = (f"MCTS (PUCT, {m.simulations} simulations, depth {m.max_depth}, value {m.value}"
               f"{'' if c.compiled else ', Python reference'})")
    elif c.search == "best_first" and "best_first" in c.model_fields_set:
        how = f"best-first ({c.best_first.max_nodes} nodes, depth {c.best_first.max_depth})"
    elif c.search == "best_first":
        how = f"best-first ({c.best_first.max_nodes} nodes on a steep cost curve, 64 on a flat one)"
    else:
        how = f"none (context matching{' and recycled top-k' if c.recycle.enabled else ''} only)"
    return f"{text}; n-gram search: {how}"


def make_drafter(method: str, target: LoadedModel, draft: LoadedModel | None = None, **options) -> Drafter:
    if method not in METHODS:
        raise MethodUnavailable(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "ar":
        return NoDrafter()
    if method == "sd":
        if draft is None:
            raise MethodUnavailable("method 'sd' needs a draft model (--draft-model)")
        check_same_tokenizer(target, draft)
        from actors.sd import ModelDrafter

        return ModelDrafter(draft.model, gamma=options.get("gamma", 4))
    if method in ("mtad", "mmtad"):
        if draft is None:
            raise MethodUnavailable(f"method {method!r} needs a draft model (--draft-model)")
        check_same_tokenizer(target, draft)
        from actors.mtad import MtadDrafter

        return MtadDrafter(draft.model, gamma=options.get("gamma", 4), beam_width=options.get("beam_width", 4),
                           tau=options.get("tau", 0.5), keep_all_beams=method == "mmtad")
    if method == "aded":
        from actors.aded import make_aded_drafter

        options = dict(options)
        store = options.pop("store", None)
        config = aded_config(options)  # before the matrix: a bad option fails at once
        ensure_default_matrix(target)
        return make_aded_drafter(target, store=store, config=config)
    raise MethodUnavailable(f"method {method!r} is not available yet")


def ensure_default_matrix(target: LoadedModel) -> None:
    """Build the target's default tri-gram matrix on first use (a minute or two; cached afterwards).

    The seed corpus needs no download: Python's standard library and installed package docs, plus the
    target's own answers to generic prompts when they ship with specd (SmolLM2's do) or were generated
    earlier by ``specd ngrams build --generate``.
    """
    import json
    import shutil
    import sys
    from pathlib import Path

    from actors.aded.corpus import build_default_matrix, default_matrix_path, generated_cache_path
    from actors.aded.prompts import CORPUS_PROMPTS

    if default_matrix_path(target.identity).exists():
        return
    shipped = Path(__file__).parent / "aded" / "data" / f"{target.identity}.generated.jsonl"
    cached = generated_cache_path(target.identity)
    if shipped.exists() and not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped, cached)
    have = {json.loads(line)["prompt"] for line in cached.read_text().splitlines()} if cached.exists() else set()
    complete = have >= set(CORPUS_PROMPTS)  # never generate here: that takes the better part of an hour
    print(f"building the default tri-gram matrix for {target.name} (one time, ~1-3 min)…", file=sys.stderr)
    build_default_matrix(target.tokenizer, target.identity, generate_fn=_never if complete else None)


def _never(prompt: str) -> str:
    raise AssertionError("every corpus prompt is cached")


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    if target.identity != draft.identity:
        raise MethodUnavailable(
            f"draft model {draft.name} has a different tokenizer than {target.name}; "
            "a draft model must share the target's vocabulary"
        )
