"""
Simulated LLM backends (SPEC section 6).

A L{SimulatorResource} answers the OpenAI (C{/v1/chat/completions},
C{/v1/completions}, C{/v1/embeddings}, C{/v1/models}) and Ollama (C{/api/chat},
C{/api/generate}, C{/api/embed}, C{/api/tags}) APIs plus C{/health}, with a configurable time to
first token, token rate, failure rate and hang rate. Every wait goes through the
injected clock, so tests drive it with L{twisted.internet.task.Clock}.

Timing: a reply started at C{t} has ticks at C{t + ttft + k / tokens_per_second}
for C{k = 0..n}. An OpenAI stream sends its role chunk at tick 0 and token C{k}
at tick C{k}; an Ollama stream sends token C{k} at tick C{k - 1} and its C{done}
line at tick C{n}; a non-streamed reply is sent whole at tick C{n}.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from attrs import validators as v
from twisted.application.service import IService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from clawproxy.listener import Listener, format_address, listen_error
from clawproxy.units import parse_duration

DEFAULT_LISTEN = "tcp:11501:interface=127.0.0.1"

#: Header value bytes refused with a 400: control characters other than HTAB.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_Json = dict[str, Any]
_Body = Coroutine[Deferred[Any], Any, None]


def _fraction(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    """attrs validator: C{value} is a probability."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0 and 1, not {value!r}")


@attrs.frozen
class SimSettings:
    """
    How one simulated backend behaves.

    @ivar id: instance name, sent as C{X-Sim-Instance}.
    @ivar model: model name reported and used when a request names none.
    @ivar ttft: seconds before the first chunk.
    @ivar tokens_per_second: generation rate after the first chunk.
    @ivar max_tokens: length of a full answer; requests may ask for fewer.
    @ivar failure_rate: probability that a completion request answers 500.
    @ivar hang_rate: probability that a completion request never answers.
    @ivar gpu_memory_used_percent: reported by C{/health}.
    """

    id: str = "sim-1"
    model: str = "sim-small"
    ttft: float = attrs.field(default=0.05, validator=v.ge(0.0))
    tokens_per_second: float = attrs.field(default=200.0, validator=v.gt(0.0))
    max_tokens: int = attrs.field(default=64, validator=v.ge(1))
    failure_rate: float = attrs.field(default=0.0, validator=_fraction)
    hang_rate: float = attrs.field(default=0.0, validator=_fraction)
    gpu_memory_used_percent: float = attrs.field(default=42.0, validator=[v.ge(0.0), v.le(100.0)])

    @classmethod
    def from_config(cls, cfg: Any) -> SimSettings:
        """
        Build settings from a C{SimulatorConfig}-like object.

        @param cfg: has C{id}, C{model}, C{ttft} (seconds), C{tokens_per_second},
            C{max_tokens}, C{failure_rate}, C{hang_rate} and optionally
            C{gpu_memory_used_percent}; a false C{id} or C{model} keeps the default.
        """
        default = cls()
        return cls(
            id=str(cfg.id or default.id),
            model=str(cfg.model or default.model),
            ttft=float(cfg.ttft),
            tokens_per_second=float(cfg.tokens_per_second),
            max_tokens=int(cfg.max_tokens),
            failure_rate=float(cfg.failure_rate),
            hang_rate=float(cfg.hang_rate),
            gpu_memory_used_percent=float(
                getattr(cfg, "gpu_memory_used_percent", default.gpu_memory_used_percent)
            ),
        )


class _BadRequest(Exception):
    """The request body cannot be served; the message goes to the client."""


@attrs.frozen
class _Job:
    """
    A parsed completion request.

    @ivar api: C{"chat"}, C{"text"} (OpenAI legacy completions), C{"ollama"}
        (C{/api/chat}) or C{"generate"} (C{/api/generate}).
    @ivar tokens: the answer, one string per token; they concatenate to the text.
    """

    api: str
    model: str
    stream: bool
    prompt_tokens: int
    tokens: tuple[str, ...]
    finish_reason: str
    include_usage: bool = False

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def usage(self) -> _Json:
        n = len(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


class _Reply:
    """
    The writing side of one in-flight completion: nothing is written once the
    client has gone, and the work is cancelled when it goes.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.gone = False
        self.started = False
        self.work: Deferred[None] | None = None

    def client_gone(self, reason: Failure) -> None:
        """C{notifyFinish} errback: stop the work and every timer it holds."""
        self.gone = True
        if self.work is not None:
            self.work.cancel()

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.started = True
            self.request.write(data)

    def finish(self) -> None:
        if not self.gone:
            self.request.finish()

    def send(self, code: int, body: bytes, content_type: bytes = b"application/json") -> None:
        """Answer with a whole body."""
        if self.gone:
            return
        self.request.setResponseCode(code)
        self.request.setHeader(b"Content-Type", content_type)
        self.request.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(message: str, type: str, code: str) -> bytes:
    """The OpenAI error shape."""
    return _dumps({"error": {"message": message, "type": type, "code": code}})


def _text_of(content: object) -> str:
    """The text of a message C{content}: a string or a list of C{{"text": ...}} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _vector(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit-ish vector for C{text} (the same text, the same vector)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0 - 0.5, 4) for b in digest[:dims]]


def _answer(words: Sequence[str], n: int) -> tuple[str, ...]:
    """
    C{n} tokens echoing C{words} in a loop, or C{token0 token1 ...} when there
    are none; every token but the first starts with a space.
    """
    chosen = [words[i % len(words)] if words else f"token{i}" for i in range(n)]
    return tuple(w if i == 0 else " " + w for i, w in enumerate(chosen))


def _limit(body: _Json, *keys: str) -> int | None:
    """The first of C{keys} present in C{body} as a token limit, validated."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadRequest(f"{key} must be an integer")
        if value < 1:
            raise _BadRequest(f"{key} must be at least 1")
        return value
    return None


_Handler = Callable[[Request], "bytes | int"]


class SimulatorResource(Resource):
    """
    A simulated LLM backend; see the module docstring for the timing model.

    @ivar settings: current L{SimSettings}; change rates with
        L{set_failure_rate} and L{set_hang_rate}.
    @ivar requests_served: completion requests answered in full, successfully.
    @ivar requests_failed: completion requests answered with a simulated 500.
    @ivar active: completion requests in flight (hung ones included).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, settings: SimSettings, clock: IReactorTime, rng: random.Random | None = None
    ) -> None:
        """
        @param settings: how to behave.
        @param clock: schedules every wait.
        @param rng: decides failures and hangs; a fresh L{random.Random} if omitted.
        """
        super().__init__()
        self.settings = settings
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._ids = itertools.count(1)
        self.requests_served = 0
        self.requests_failed = 0
        self.active = 0
        self._routes: dict[bytes, tuple[bytes, _Handler]] = {
            b"/v1/chat/completions": (b"POST", lambda r: self._complete(r, "chat")),
            b"/v1/completions": (b"POST", lambda r: self._complete(r, "text")),
            b"/api/chat": (b"POST", lambda r: self._complete(r, "ollama")),
            b"/api/generate": (b"POST", lambda r: self._complete(r, "generate")),
            b"/v1/embeddings": (b"POST", lambda r: self._embed(r, "openai")),
            b"/api/embed": (b"POST", lambda r: self._embed(r, "ollama")),
            b"/v1/models": (b"GET", self._openai_models),
            b"/api/tags": (b"GET", self._ollama_tags),
            b"/health": (b"GET", self._health),
        }

    def set_failure_rate(self, p: float) -> None:
        """Answer 500 to a completion request with probability C{p} from now on."""
        self.settings = attrs.evolve(self.settings, failure_rate=p)

    def set_hang_rate(self, p: float) -> None:
        """Never answer a completion request with probability C{p} from now on."""
        self.settings = attrs.evolve(self.settings, hang_rate=p)

    # Routing

    def render(self, request: Request) -> bytes | int:
        """
        Route by exact path; unknown paths get a 404 JSON error, header
        values with control characters (other than HTAB) a 400 JSON error.
        """
        request.setHeader(b"X-Sim-Instance", self.settings.id.encode())
        for _, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                if _CONTROL.search(value) is not None:
                    return self._error(request, 400, "control character in a header value",
                                       "invalid_request_error", "invalid_header")
        path = request.path.rstrip(b"/") or b"/"
        route = self._routes.get(path)
        if route is None:
            return self._error(request, 404, "no such path", "invalid_request_error", "not_found")
        method, handler = route
        if request.method != method and (method, request.method) != (b"GET", b"HEAD"):
            request.setHeader(b"Allow", method)
            return self._error(
                request, 405, "method not allowed", "invalid_request_error", "method_not_allowed"
            )
        return handler(request)

    def _error(self, request: Request, status: int, message: str, type: str, code: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return _error_body(message, type, code)

    def _json(self, request: Request, obj: object) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return _dumps(obj)

    # Simple endpoints

    def _openai_models(self, request: Request) -> bytes:
        model = {
            "id": self.settings.model,
            "object": "model",
            "created": int(self._clock.seconds()),
            "owned_by": "clawproxy-sim",
        }
        return self._json(request, {"object": "list", "data": [model]})

    def _ollama_tags(self, request: Request) -> bytes:
        model = {
            "name": self.settings.model,
            "model": self.settings.model,
            "modified_at": self._timestamp(),
            "size": 0,
            "digest": f"sim-{self.settings.id}",
            "details": {"format": "sim", "family": "sim", "parameter_size": "0B"},
        }
        return self._json(request, {"models": [model]})

    def _health(self, request: Request) -> bytes:
        s = self.settings
        return self._json(
            request,
            {
                "status": "ok",
                "id": s.id,
                "model": s.model,
                "cpu": min(100.0, 2.0 + 8.0 * self.active),
                "mem": min(100.0, 30.0 + 0.5 * self.active),
                "gpu_memory_used_percent": s.gpu_memory_used_percent,
                "active": self.active,
            },
        )

    def _embed(self, request: Request, api: str) -> bytes:
        """
        Embeddings (OpenAI C{/v1/embeddings}, Ollama C{/api/embed}): one
        small deterministic vector per input text, at once.
        """
        try:
            body = json.loads(request.content.read() if request.content is not None else b"")
        except (ValueError, RecursionError):
            body = None
        inputs = body.get("input") if isinstance(body, dict) else None
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return self._error(request, 400, "input must be a string or a list of strings",
                               "invalid_request_error", "bad_request")
        model = body.get("model") or self.settings.model
        vectors = [_vector(t) for t in texts]
        tokens = sum(len(t.split()) for t in texts)
        if api == "ollama":
            return self._json(request, {"model": model, "embeddings": vectors,
                                        "prompt_eval_count": tokens})
        return self._json(request, {
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": v}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    # Completions

    def _complete(self, request: Request, api: str) -> bytes | int:
        """Parse, then fail, hang or start answering, as the dice say."""
        try:
            job = self._parse(request, api)
        except _BadRequest as e:
            return self._error(request, 400, str(e), "invalid_request_error", "bad_request")
        s = self.settings
        if self._roll(s.failure_rate):
            self.requests_failed += 1
            return self._error(request, 500, "simulated failure", "server_error", "sim_failure")
        if self._roll(s.hang_rate):
            return self._run(request, lambda reply: self._hang())
        if api in ("ollama", "generate"):
            body = self._ollama_stream if job.stream else self._ollama_whole
        else:
            body = self._openai_stream if job.stream else self._openai_whole
        return self._run(request, lambda reply: body(reply, job))

    def _roll(self, p: float) -> bool:
        return p > 0.0 and self._rng.random() < p

    def _parse(self, request: Request, api: str) -> _Job:
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise _BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        if api in ("text", "generate"):
            prompt = body.get("prompt", "")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise _BadRequest("prompt must be a string or a list of strings")
            texts = prompts
            last = prompts[-1] if prompts else ""
        else:
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise _BadRequest("messages must be a list of objects")
            texts = [_text_of(m.get("content")) for m in messages]
            users = [t for m, t in zip(messages, texts) if m.get("role") == "user"]
            last = users[-1] if users else ""
        model = body.get("model") or self.settings.model
        if not isinstance(model, str):
            raise _BadRequest("model must be a string")
        if api in ("ollama", "generate"):
            options = body.get("options")
            if not isinstance(options, dict):
                options = {}
            elif isinstance(options.get("num_predict"), int) and options["num_predict"] <= 0:
                options = {}  # Ollama: -1 is "no limit", -2 "fill the context"
            requested = _limit(options, "num_predict") or _limit(body, "max_tokens")
            stream = body.get("stream", True) is not False
        else:
            requested = _limit(body, "max_completion_tokens", "max_tokens")
            stream = body.get("stream") is True
        cap = self.settings.max_tokens
        n = min(requested, cap) if requested is not None else cap
        options = body.get("stream_options")
        return _Job(
            api=api,
            model=model,
            stream=stream,
            prompt_tokens=sum(len(t.split()) for t in texts),
            tokens=_answer(last.split(), n),
            finish_reason="length" if n < cap else "stop",
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    def _run(self, request: Request, body: Callable[[_Reply], _Body]) -> int:
        """Run C{body} until done or until the client goes, whichever is first."""
        reply = _Reply(request)
        request.notifyFinish().addErrback(reply.client_gone)
        self.active += 1
        work: Deferred[None] = Deferred.fromCoroutine(body(reply))
        reply.work = work
        work.addCallbacks(self._served, self._failed, errbackArgs=(reply,))
        work.addBoth(self._idle)
        return NOT_DONE_YET

    def _served(self, _: None) -> None:
        self.requests_served += 1

    def _failed(self, failure: Failure, reply: _Reply) -> None:
        if failure.check(CancelledError) and reply.gone:
            return
        self.log.failure("simulated reply failed", failure)
        if reply.started:
            reply.finish()
        else:
            reply.send(500, _error_body("simulator error", "server_error", "sim_error"))

    def _idle(self, _: object) -> None:
        self.active -= 1

    async def _hang(self) -> None:
        """Wait for the client to give up; no timers are involved."""
        await Deferred()

    async def _at(self, when: float) -> None:
        """Sleep until C{when} on the clock (at once if that has passed)."""
        await deferLater(self._clock, max(0.0, when - self._clock.seconds()))

    def _ticks(self) -> Callable[[int], float]:
        """Tick C{k} of a reply that starts now."""
        start = self._clock.seconds() + self.settings.ttft
        rate = self.settings.tokens_per_second
        return lambda k: start + k / rate

    def _timestamp(self) -> str:
        when = datetime.fromtimestamp(self._clock.seconds(), tz=UTC)
        return when.isoformat(timespec="microseconds").replace("+00:00", "Z")

    def _head(self, job: _Job, chunk: bool) -> _Json:
        """The C{id}/C{object}/C{created}/C{model} fields of an OpenAI reply."""
        kind = "chat.completion" if job.api == "chat" else "text_completion"
        if chunk and job.api == "chat":
            kind += ".chunk"
        prefix = "chatcmpl" if job.api == "chat" else "cmpl"
        return {
            "id": f"{prefix}-{self.settings.id}-{next(self._ids)}",
            "object": kind,
            "created": int(self._clock.seconds()),
            "model": job.model,
        }

    async def _openai_whole(self, reply: _Reply, job: _Job) -> None:
        head = self._head(job, chunk=False)
        await self._at(self._ticks()(len(job.tokens)))
        choice: _Json = {"index": 0, "finish_reason": job.finish_reason}
        if job.api == "chat":
            choice["message"] = {"role": "assistant", "content": job.text}
        else:
            choice.update(text=job.text, logprobs=None)
        body = {**head, "choices": [choice], "usage": job.usage()}
        reply.send(200, _dumps(body))

    async def _openai_stream(self, reply: _Reply, job: _Job) -> None:
        tick = self._ticks()
        head = self._head(job, chunk=True)
        request = reply.request
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")

        def event(delta: _Json | str, finish_reason: str | None = None) -> None:
            choice: _Json = {"index": 0, "finish_reason": finish_reason}
            if job.api == "chat":
                choice["delta"] = delta
            else:
                choice.update(text=delta, logprobs=None)
            reply.write(b"data: " + _dumps({**head, "choices": [choice]}) + b"\n\n")

        await self._at(tick(0))
        event({"role": "assistant", "content": ""} if job.api == "chat" else "")
        for k, token in enumerate(job.tokens, 1):
            await self._at(tick(k))
            event({"content": token} if job.api == "chat" else token)
        event({} if job.api == "chat" else "", job.finish_reason)
        if job.include_usage:
            reply.write(b"data: " + _dumps({**head, "choices": [], "usage": job.usage()}) + b"\n\n")
        reply.write(b"data: [DONE]\n\n")
        reply.finish()

    def _ollama_done(self, job: _Job, started: float) -> _Json:
        total = int((self._clock.seconds() - started) * 1e9)
        return {
            "model": job.model,
            "created_at": self._timestamp(),
            **({"response": ""} if job.api == "generate" else
               {"message": {"role": "assistant", "content": ""}}),
            "done": True,
            "done_reason": "length" if job.finish_reason == "length" else "stop",
            "total_duration": total,
            "load_duration": 0,
            "prompt_eval_count": job.prompt_tokens,
            "eval_count": len(job.tokens),
        }

    async def _ollama_whole(self, reply: _Reply, job: _Job) -> None:
        started = self._clock.seconds()
        await self._at(self._ticks()(len(job.tokens)))
        body = self._ollama_done(job, started)
        if job.api == "generate":
            body["response"] = job.text
        else:
            body["message"]["content"] = job.text
        reply.send(200, _dumps(body))

    async def _ollama_stream(self, reply: _Reply, job: _Job) -> None:
        started = self._clock.seconds()
        tick = self._ticks()
        reply.request.setHeader(b"Content-Type", b"application/x-ndjson")
        for k, token in enumerate(job.tokens):
            await self._at(tick(k))
            line = {
                "model": job.model,
                "created_at": self._timestamp(),
                **({"response": token} if job.api == "generate" else
                   {"message": {"role": "assistant", "content": token}}),
                "done": False,
            }
            reply.write(_dumps(line) + b"\n")
        await self._at(tick(len(job.tokens)))
        reply.write(_dumps(self._ollama_done(job, started)) + b"\n")
        reply.finish()


class _QuietSite(Site):
    """A L{Site} that writes no access log: a simulator under load would drown in it."""

    noisy = False

    def log(self, request: Request) -> None:
        """Log nothing."""


def simulator_site(
    settings: SimSettings, clock: IReactorTime, rng: random.Random | None = None
) -> Site:
    """
    A quiet L{Site} serving a L{SimulatorResource} (reachable as C{site.resource}).

    @param clock: used by the resource and for the site's connection timeouts.
    """
    # No form parsing of POST bodies: the simulator reads JSON whatever the
    # Content-Type, and Twisted's parse raises (dropping the connection) on a
    # Content-Type holding a byte Python counts as a line break (VT, FF...).
    return _QuietSite(SimulatorResource(settings, clock, rng), logPath=None, reactor=clock,
                      parsePOSTFormSubmission=False)


def simulator_service(cfg: Any, reactor: Any, key: str = "listen") -> IService:
    """
    A service listening on C{cfg.listen} with a simulator built from C{cfg}.

    It logs C{simulator ID listening on HOST:PORT} once listening, and an
    address it cannot take stops the start with one line (L{Listener}).

    @param cfg: a C{SimulatorConfig}: C{listen} plus what L{SimSettings.from_config} reads.
    @param reactor: the reactor to listen with and to use as the clock.
    @param key: the config key C{cfg.listen} came from, for that line.
    @return: a service named after the simulator's id.
    """
    settings = SimSettings.from_config(cfg)
    service = Listener(serverFromString(reactor, cfg.listen), simulator_site(settings, reactor),
                       f"simulator {settings.id}", f"{key}: {cfg.listen}")
    service.setName(settings.id)
    return service


def _duration(text: str) -> float:
    """argparse type: seconds in C{text} (C{50ms}, C{2s}, a bare number)."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_sim_args(argv: Sequence[str]) -> tuple[str, SimSettings]:
    """
    Parse C{clawproxy sim} arguments.

    @return: the listen endpoint string and the settings.
    @raise SystemExit: on bad arguments or C{--help}, as argparse does.
    """
    d = SimSettings()
    p = argparse.ArgumentParser(prog="clawproxy sim", description="Run a simulated LLM backend.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="endpoint (default: %(default)s)")
    p.add_argument("--id", default=d.id)
    p.add_argument("--model", default=d.model)
    p.add_argument("--ttft", type=_duration, default=d.ttft, help="e.g. 50ms, 2s")
    p.add_argument("--tokens-per-second", type=float, default=d.tokens_per_second)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--failure-rate", type=float, default=d.failure_rate)
    p.add_argument("--hang-rate", type=float, default=d.hang_rate)
    p.add_argument("--gpu-memory", type=float, default=d.gpu_memory_used_percent)
    a = p.parse_args(list(argv))
    try:
        settings = SimSettings(
            id=a.id,
            model=a.model,
            ttft=a.ttft,
            tokens_per_second=a.tokens_per_second,
            max_tokens=a.max_tokens,
            failure_rate=a.failure_rate,
            hang_rate=a.hang_rate,
            gpu_memory_used_percent=a.gpu_memory,
        )
    except ValueError as e:
        p.error(str(e))
    return a.listen, settings


def sim_main(argv: list[str]) -> int:
    """
    C{clawproxy sim}: serve one simulator on the global reactor until stopped.

    @param argv: the arguments after C{sim}.
    @return: the exit status.
    """
    try:
        listen, settings = parse_sim_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    from twisted.internet import reactor

    status = 0
    role = f"simulator {settings.id}"

    def listening(port: Any) -> None:
        print(f"{role} listening on {format_address(port.getHost())}", flush=True)

    def failed(reason: Failure) -> None:
        nonlocal status
        status = 1
        print(listen_error(role, f"--listen {listen}", reason), file=sys.stderr)
        reactor.stop()  # type: ignore[attr-defined]

    try:
        endpoint = serverFromString(reactor, listen)
    except ValueError as e:
        print(f"clawproxy sim: bad --listen {listen!r}: {e}", file=sys.stderr)
        return 2
    site = simulator_site(settings, reactor)  # type: ignore[arg-type]
    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: endpoint.listen(site).addCallbacks(listening, failed)
    )
    reactor.run()  # type: ignore[attr-defined]
    return status
