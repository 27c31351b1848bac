"""Streamed answers as text: incremental detokenization, stop strings, server-sent event framing.

A token is not a piece of text of its own: a SentencePiece byte piece or a GPT-2 byte is part of a
character whose other bytes come later, and the decoded text of a prefix of tokens ends in U+FFFD
until they do. So each delta is the text of all tokens so far (as the answer's `text` would read
them) minus what was sent, holding back a replacement-character tail (and, with stop strings, a
tail that may begin one); the final delta is the rest of the finished answer's text, so the deltas
add up to exactly that text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger("serving.streaming")

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes of a character not complete yet
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either


def sse_data(json_text: str) -> str:
    """One server-sent event carrying one line of JSON."""
    return f"data: {json_text}\n\n"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string it holds, and whether one was found."""
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_prefix_tail(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that a stop string starts with (it may yet complete)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextDeltas:
    """Text deltas of a growing answer: `push(text)` (the text of all tokens so far) returns what
    became certain, `finish(text)` the rest of the finished answer, cut at the first stop string."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = tuple(stop)
        self.sent = ""
        self.stopped = False  # a stop string was reached, or the answer finished: nothing more is sent

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        text = text.rstrip(REPLACEMENT)
        content, stopped = cut_at_stop(text, self._stop)
        # A stop string that the next tokens may complete could start before the one found.
        safe = len(text) - _stop_prefix_tail(text, self._stop)
        if len(content) > safe:
            content, stopped = content[:safe], False
        return self._send(content, stopped)

    def finish(self, text: str) -> str:
        """The rest of the answer: `text` is the finished answer's text (before any stop cut)."""
        return self._send(cut_at_stop(text, self._stop)[0], True)

    def _send(self, content: str, final: bool) -> str:
        if not content.startswith(self.sent):
            # The text changed under what was sent (no tokenizer or parser here does that): stop.
            if final:
                logger.warning("streamed text is not a prefix of the answer", extra={"sent": self.sent})
                self.stopped = True
            return ""
        delta, self.sent = content[len(self.sent) :], content
        self.stopped = self.stopped or final
        return delta
