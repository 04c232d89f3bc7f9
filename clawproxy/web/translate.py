"""
Request rewrites decided by the gateway and applied by the relay: model
aliases, a body a request stage changed, and the OpenAI -> Ollama
translation for C{protocol: ollama} pools (request, answer and errors).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from clawproxy.policy import ollama


class BodyTranslator(Protocol):
    content_type: bytes

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Rewrite:
    """
    Send C{body} (and, if given, C{path}) upstream instead of the client's;
    L{response} and L{error} say how to translate what comes back.
    """

    def __init__(self, body: dict[str, Any], path: bytes | None = None) -> None:
        self.body = json.dumps(body, separators=(",", ":")).encode()
        self.path = path

    def response(self) -> BodyTranslator | None:
        """Makes a L{BodyTranslator} for a successful answer, or None to relay it."""
        return None

    def error(self, status: int) -> BodyTranslator | None:
        """Makes a L{BodyTranslator} for an error answer (4xx/5xx), or None to relay it."""
        return None


class OllamaChat(Rewrite):
    """An OpenAI chat completion sent to Ollama's C{/api/chat} and translated back."""

    #: Ollama's endpoint, the builder of its request, the prefix of the
    #: OpenAI answer's id, and whether that answer is a C{text_completion}.
    _endpoint = b"/api/chat"
    _build = staticmethod(ollama.chat_request)
    _id_prefix = "chatcmpl-"
    _text = False

    def __init__(self, body: dict[str, Any], model: str, request_id: str) -> None:
        super().__init__(self._build(body, model), self._endpoint)
        self.model = model
        self.stream = bool(body.get("stream", False))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.completion_id = self._id_prefix + request_id

    #: The translator of the answer, once L{response} made it (its C{usage}
    #: holds the counts Ollama reported, for token accounting).
    translator: BodyTranslator | None = None

    def response(self) -> BodyTranslator:
        if self.stream:
            self.translator = ollama.StreamTranslator(self.model, self.completion_id,
                                                      self.include_usage, text=self._text)
        else:
            self.translator = ollama.CompletionCollector(self.model, self.completion_id,
                                                         text=self._text)
        return self.translator

    def error(self, status: int) -> BodyTranslator:
        return ollama.ErrorTranslator(status)


class OllamaCompletion(OllamaChat):
    """An OpenAI (legacy) completion sent to Ollama's C{/api/generate}."""

    _endpoint = b"/api/generate"
    _build = staticmethod(ollama.generate_request)
    _id_prefix = "cmpl-"
    _text = True


class OllamaEmbed(OllamaChat):
    """An OpenAI embeddings request sent to Ollama's C{/api/embed}."""

    def __init__(self, body: dict[str, Any], model: str, request_id: str) -> None:
        Rewrite.__init__(self, ollama.embed_request(body, model), b"/api/embed")
        self.model = model
        self.base64 = body.get("encoding_format") == "base64"

    def response(self) -> BodyTranslator:
        self.translator = ollama.EmbedCollector(self.model, self.base64)
        return self.translator


#: OpenAI endpoints translated for C{protocol: ollama} pools, and how.
OLLAMA_TRANSLATIONS: dict[bytes, type[OllamaChat]] = {
    b"/v1/chat/completions": OllamaChat,
    b"/v1/completions": OllamaCompletion,
    b"/v1/embeddings": OllamaEmbed,
}


def rewrite_for(pool: Any, local_path: bytes, method: bytes, body: dict[str, Any] | None,
                model: str | None, request_id: str, changed: bool = False) -> Rewrite | None:
    """
    What (if anything) to change in a request going to C{pool}.

    @param changed: a stage changed C{body}: send it even when the model stays.
    """
    if body is None:
        return None
    if pool.config.protocol == "ollama" and method == b"POST" and (
            local_path in OLLAMA_TRANSLATIONS):
        return OLLAMA_TRANSLATIONS[local_path](body, model or body.get("model", ""),
                                               request_id)
    if model is not None and body.get("model") != model:
        return Rewrite(dict(body, model=model))
    if changed:
        return Rewrite(body)
    return None
