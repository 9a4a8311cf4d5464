"""Stop strings on a text stream: end at the first occurrence, and never stream part of one.

A stop string can span several tokens, so text is held back while its tail could still grow
into a stop string; once it cannot, it is released. The stop string itself is not returned
(OpenAI's behaviour).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lmforge.tokenizer import StreamDecoder, Tokenizer


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text safe to emit now; after a stop string is found, `stopped` is True and the rest is dropped."""
        if self.stopped:
            return ""
        self._held += text
        if not self.stops:
            out, self._held = self._held, ""
            return out
        hits = [i for i in (self._held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = self._held[:min(hits)], ""
            return out
        keep = self._partial_suffix()
        out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def flush(self) -> str:
        """What is still held back at the end of generation (it never completed a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of the held text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best


def stop_at_strings(stream: Iterator[int], tokenizer: Tokenizer, stops: Sequence[str]
                    ) -> Iterator[tuple[int | None, str]]:
    """(token, text safe to show) for each generated token, ending after the token that completes a stop
    string (the stream is closed, so decoding stops too); a last (None, tail) releases held-back text."""
    decoder, matcher = StreamDecoder(tokenizer), StopMatcher(stops)
    try:
        for token in stream:
            text = matcher.push(decoder.push(token))
            yield token, text
            if matcher.stopped:
                return
        yield None, matcher.push(decoder.flush()) + matcher.flush()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
