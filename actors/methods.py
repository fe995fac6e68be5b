"""Decoding methods by name: each maps to a drafter built once per process and shared by requests."""

from __future__ import annotations

from actors.drafter import Drafter, NoDrafter
from actors.models import LoadedModel


class MethodUnavailable(ValueError):
    """The method exists but cannot run with what was given (or is not built yet)."""


#: name -> (lossless, one-line description)
METHODS: dict[str, tuple[bool, str]] = {
    "ar": (True, "plain autoregressive decoding (the baseline)"),
    "sd": (True, "standard speculative decoding with an auxiliary draft model (lossless)"),
    "aded": (True, "ADED: adaptive tri-gram matrix + MCTS draft trees, no draft model (lossless)"),
    "mtad": (False, "MTAD: auxiliary-model multi-token joint decoding (APPROXIMATE by design)"),
    "mmtad": (False, "MMTAD: MTAD keeping all beams as a draft tree (APPROXIMATE by design)"),
}


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
    raise MethodUnavailable(f"method {method!r} is not available yet")


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    if target.identity != draft.identity:
        raise MethodUnavailable(
            f"draft model {draft.name} has a different tokenizer than {target.name}; "
            "a draft model must share the target's vocabulary"
        )
