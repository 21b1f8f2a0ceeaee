"""Streamed content: the text of the tokens generated so far, minus what may still become a tool call or a stop."""

from ..data.toolcalls import FUNCTIONCALL, TOOL_CALL_OPEN

TOOL_TAGS = (TOOL_CALL_OPEN, FUNCTIONCALL)


class _StreamText:
    """Incremental text for streaming: decodes the tokens so far, holds back what may still become a tool-call
    tag or a stop string (or an incomplete UTF-8 character), and stops emitting content at either."""

    def __init__(self, tokenizer, prefix: str, watch_tools: bool, stop: list[str]):
        self.tokenizer, self.prefix, self.watch_tools, self.stop = tokenizer, prefix, watch_tools, stop
        self.ids: list[int] = []
        self.emitted = 0
        self.closed = bool(prefix)  # a forced call: nothing to stream as content

    def _safe_end(self, text: str) -> int:
        markers = (list(TOOL_TAGS) if self.watch_tools else []) + self.stop
        end = len(text)
        for m in markers:
            i = text.find(m)
            if i >= 0:
                self.closed = True
                end = min(end, i)
        if self.closed:
            return end
        for m in markers:  # a suffix that is the start of a marker: wait for more tokens
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    end = min(end, len(text) - k)
                    break
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        return end

    def push(self, token: int) -> str:
        if self.closed:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = self._safe_end(text)
        out = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out
