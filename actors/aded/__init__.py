"""ADED: a draft-model-free drafter built on a tri-gram picture of the target (arXiv 2407.12021).

Pieces, each usable alone:
- ``trigram``: the static matrix (numpy CSR, safetensors) and ``build_matrix``;
- ``corpus``: seed corpora (stdlib sources, package docs, files, the target's own answers) and
  ``build_default_matrix`` for ``specd ngrams build``;
- ``ngram``: matrix + adaptive ``NGramStore`` as one successor model, and what feedback folds in;
- ``suffix`` / ``history``: matches in the request's own context and in earlier requests;
- ``tree`` / ``mcts``: candidate trees (best-first by path probability; ADED's MCTS);
- ``budget``: online acceptance calibration and the cost-aware draft size;
- ``drafter``: :class:`AdedDrafter`, the ``actors.drafter.Drafter`` the engine runs;
- ``simulator``: offline replay of recorded greedy outputs.
"""

from __future__ import annotations

from pathlib import Path

from actors.aded.drafter import AdedConfig, AdedDrafter
from actors.aded.trigram import TrigramMatrix


def make_aded_drafter(target, store=None, matrix_path: str | Path | None = None, cost_model=None,
                      config: AdedConfig | dict | None = None) -> AdedDrafter:
    """An :class:`AdedDrafter` for a loaded target (``actors.models.LoadedModel``).

    The matrix defaults to ``default_matrix_path(target.identity)`` (built by ``specd ngrams build``),
    the store to an in-process one, and the cost curve to the target's ``specd profile`` output, else the
    SmolLM2 CPU curve (a steep curve only makes the budget cautious, never slower than plain decoding).
    """
    from actors.aded.corpus import default_matrix_path
    from actors.cost import CostModel, smollm2_cpu_cost
    from shared_state import MemoryStore, StoreConfig

    path = Path(matrix_path) if matrix_path else default_matrix_path(target.identity)
    if not path.exists():
        raise FileNotFoundError(f"no tri-gram matrix at {path}: build it with `specd ngrams build`")
    matrix = TrigramMatrix.load(path)
    if matrix.identity and matrix.identity != target.identity:
        raise ValueError(f"matrix {path} was built for tokenizer {matrix.identity}, not {target.identity}")
    if cost_model is None:
        from actors.profile import profile_path

        profile = profile_path(target)
        cost_model = CostModel.from_json(profile) if profile.exists() else smollm2_cpu_cost(target.kernels)
    if isinstance(config, dict):
        config = AdedConfig(**config)
    store = store if store is not None else MemoryStore(StoreConfig(namespace=target.identity))
    return AdedDrafter(matrix, store, config, cost_model)


__all__ = ["AdedConfig", "AdedDrafter", "TrigramMatrix", "make_aded_drafter"]
