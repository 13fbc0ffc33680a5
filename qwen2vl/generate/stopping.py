"""Stop strings on streamed text, as the OpenAI API and vLLM treat them: the output ends just before the earliest
stop string, which is not shown, and text that might be the start of a stop string is held back until it is
clear. The matcher sees decoded text, not tokens, so a stop string may span any number of tokens."""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if not all(isinstance(s, str) for s in stops):
            raise TypeError(f"stop strings must be strings, got {stops!r}")
        self.stops = tuple(s for s in stops if s)
        self.held = ""  # text not shown yet because it could begin a stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the output

    def feed(self, text: str) -> str:
        """Add newly decoded text; return what can be shown now (nothing more once a stop string was seen)."""
        if self.stopped:
            return ""
        self.held += text
        # nothing shown earlier can be part of a stop string (it would have been held), so searching the held
        # text finds every occurrence; the earliest one wins, and the longest stop string on a tie
        hits = [(i, -len(s), s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if hits:
            cut, _, self.matched = min(hits)
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """The end of the stream: what was held back is shown after all (unless a stop string was seen)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
