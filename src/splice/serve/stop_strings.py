"""Stop strings on a text stream: cut the completion before the first stop string and hold
back text that may be the start of one.

The filter sees the completion's text in pieces (the detokenizer's deltas). It keeps the text
not yet released; after each piece it looks for a stop string in it (only where a match can
be new: from ``len(stop) − 1`` characters before the piece). On a match the completion is
the text before the match's start, and generation ends. Otherwise it releases all but the
longest tail that is a proper prefix of some stop string (a stop string may be completing
across tokens); that tail is released by ``flush`` when generation ends for another reason.
With no stop strings every piece is released as it comes.
"""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""  # received, not yet released
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add ``piece``; return the text now safe to release. Sets ``stopped`` on a match."""
        if not self.stops:
            return piece
        start = max(0, len(self.pending) - self.longest + 1)
        self.pending += piece
        hits = [i for s in self.stops if (i := self.pending.find(s, start)) >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = self._partial_tail()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _partial_tail(self) -> int:
        """Length of the longest tail of ``pending`` that a stop string starts with."""
        for n in range(min(len(self.pending), self.longest - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
