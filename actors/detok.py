"""Incremental detokenization and stop strings for streamed output."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding a token alone loses context (SentencePiece leading spaces, multi-token UTF-8 characters),
    so each delta is the difference between decoding a short window with and without the new tokens
    (vLLM's prefix/read offsets). A delta ending in U+FFFD is an incomplete character: held back.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int, final: bool = False) -> str:
        self.ids.append(int(token_id))
        return self._advance(final)

    def flush(self) -> str:
        """Emit whatever is held back (the stream has ended)."""
        return self._advance(final=True) if self._read < len(self.ids) else ""

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd") and not final:
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int:
    """Index in ``text`` where the earliest stop string starts at or after ``search_from``, or -1."""
    hits = [i for i in (text.find(s, max(0, search_from - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits, default=-1)
