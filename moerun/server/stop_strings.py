"""`stop` strings on streamed text: emit what cannot start a stop string, cut at the first hit."""


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""  # text that may be the start of a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """New text in, text safe to emit out (never part of a stop string)."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[: min(hits)]
        keep = 0  # longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of output: held text was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
