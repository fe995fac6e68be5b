"""The one draft format every drafter produces and the verifier consumes.

A draft is a tree hanging below the *pending* token (the last committed token, whose KV is not yet
cached). Node ``i`` carries ``tokens[i]``; ``parents[i]`` is the index of its parent node, or ``-1``
when its parent is the pending token. Parents always precede children (``parents[i] < i``), so a
chain is ``parents = [-1, 0, 1, ...]``.

Everything the verifier needs (attention mask, position offsets, paths) is derived here, from the
parents alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Draft:
    tokens: np.ndarray  # [n] int64
    parents: np.ndarray  # [n] int64, -1 = child of the pending token
    # Optional proposal distributions for lossless sampling: q[i] is the distribution node i's token was
    # *sampled* from (siblings sampled without replacement share one row). None means the tree was
    # chosen without sampling (deterministic, or random but independent of the target): acceptance then
    # treats every node as a point-mass proposal, which is exact for any such tree.
    q: torch.Tensor | None = None  # [n, vocab] float32
    # Drafter-private annotations (e.g. ADED's calibration buckets): ignored by the engine, never sent.
    info: dict = field(default_factory=dict)
    # Optional calibrated P(node i is on the accepted path), for drafts ranked so that every prefix is a
    # tree: the engine's batch budget may then verify only a prefix (actors.budget). None: verify all.
    p_accept: np.ndarray | None = None  # [n] float64
    # [n] float64 log q of each node's token given its path, or [0] when the drafter has none. Read by the
    # MTAD/MMTAD acceptance rules (a drafter whose ``acceptance`` is one of them must fill it) and sent
    # with the draft (``DraftTree.logq``).
    logq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64), kw_only=True)

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens, dtype=np.int64).reshape(-1)
        parents = np.asarray(self.parents, dtype=np.int64).reshape(-1)
        if tokens.shape != parents.shape:
            raise ValueError(f"tokens {tokens.shape} and parents {parents.shape} differ in length")
        if len(parents) and not np.all((parents >= -1) & (parents < np.arange(len(parents)))):
            raise ValueError("every parent index must be -1 or an earlier node")
        if self.q is not None and self.q.shape[0] != len(tokens):
            raise ValueError(f"q has {self.q.shape[0]} rows for {len(tokens)} nodes")
        if self.p_accept is not None:
            p_accept = np.asarray(self.p_accept, dtype=np.float64).reshape(-1)
            if p_accept.shape != tokens.shape:
                raise ValueError(f"p_accept has {len(p_accept)} entries for {len(tokens)} nodes")
            if not np.all((p_accept >= 0) & (p_accept <= 1)):  # NaN fails too
                raise ValueError("p_accept must be probabilities in [0, 1]")
            object.__setattr__(self, "p_accept", p_accept)
        logq = np.asarray(self.logq, dtype=np.float64).reshape(-1)
        if len(logq) not in (0, len(tokens)):
            raise ValueError(f"logq has {len(logq)} entries for {len(tokens)} nodes")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "logq", logq)

    @classmethod
    def empty(cls) -> Draft:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def chain(cls, tokens, q: torch.Tensor | None = None, info: dict | None = None) -> Draft:
        n = len(tokens)
        return cls(np.asarray(tokens, np.int64), np.arange(n, dtype=np.int64) - 1, q, info or {})

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, n: int) -> Draft:
        """The first ``n`` nodes (a tree: parents precede children); per-node annotations cut alike."""
        if n >= len(self):
            return self
        info = {k: v[:n] if isinstance(v, (np.ndarray, list, tuple)) and len(v) == len(self) else v
                for k, v in self.info.items()}
        q = None if self.q is None else self.q[:n]
        p = None if self.p_accept is None else self.p_accept[:n]
        return Draft(self.tokens[:n], self.parents[:n], q, info, p, logq=self.logq[:n])

    @property
    def is_chain(self) -> bool:
        return bool(np.all(self.parents == np.arange(len(self)) - 1))

    def depths(self) -> np.ndarray:
        """[n] depth below the pending token (children of the pending token have depth 1)."""
        d = np.zeros(len(self), np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    def children(self) -> list[list[int]]:
        """children()[0] lists the pending token's children, children()[i + 1] node i's, in index order."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def path_to(self, i: int) -> list[int]:
        """Node indices from the first level down to node i."""
        path = []
        while i >= 0:
            path.append(i)
            i = int(self.parents[i])
        return path[::-1]


def tree_attention_mask(parents: np.ndarray) -> torch.Tensor:
    """[1 + n, 1 + n] bool: row r may attend to column c (row 0 is the pending token, row i + 1 node i).

    Every row sees the pending token and itself; a node also sees its ancestors.
    """
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 0] = True
    for i, p in enumerate(parents):
        mask[i + 1] = mask[p + 1] if p >= 0 else mask[0]
        mask[i + 1, i + 1] = True
    return mask
