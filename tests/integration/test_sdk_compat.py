"""
Real, unmodified clients from PyPI against a real gateway over loopback: the
official C{openai} SDK (sync, async, streams with and without usage, models,
embeddings, an unknown model, a budget refusal) and the official C{ollama} client through the
Ollama pass-through, with simulated backends of both protocols.

The SDKs block (or run their own asyncio loop): each call runs in a thread
(C{deferToThread}) with client timeouts and a bounded wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from clawproxy.config.fields import hash_key
from tests.integration.helpers import Harness, bounded, pool

try:
    import ollama
    import openai
except ImportError:  # pragma: no cover - CI installs the test extra
    openai = ollama = None

KEY = "sk-sdk-agent-0123456789"
MESSAGES = [{"role": "user", "content": "hello there"}]


def _sim_vector(text: str) -> list[float]:
    from clawproxy.simulator import _vector
    return _vector(text)


def in_thread(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    return bounded(deferToThread(fn), seconds)


class SdkTests(TestCase):
    timeout = 60

    async def start(self, translate: bool = False, **agent: Any) -> Any:
        """
        A gateway over an OpenAI and an Ollama simulator: C{/api/*} to the
        Ollama one, C{/v1/*} to the OpenAI one (to the Ollama one, translated,
        with C{translate}).
        """
        if openai is None:
            raise SkipTest("the test extra is not installed (pip install -e .[test])")
        h = Harness(self)
        oa = h.simulator("oa", max_tokens=6)
        ol = h.simulator("ol", max_tokens=6)
        config = h.config(
            {"openai": pool(oa, models=["sim-small"]), "ollama": pool(ol, protocol="ollama")},
            routes=[{"path": "/api/*", "pool": "ollama"},
                    {"path": "/v1/*", "pool": "ollama" if translate else "openai"}],
            agents={"sdk": {"keys": [hash_key(KEY)], **agent}},
        )
        self.gw = await h.gateway(config)
        self.h = h
        return self.gw

    def openai_client(self) -> Any:
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=KEY, max_retries=0,
                             timeout=10)

    def tokens(self, kind: str) -> float | None:
        return self.gw.gateway.metrics.registry.get_sample_value(
            "clawproxy_tokens_total", {"agent": "sdk", "model": "sim-small", "kind": kind})

    async def test_openai_sync(self) -> None:
        await self.start()

        def call() -> Any:
            return self.openai_client().chat.completions.create(
                model="sim-small", messages=MESSAGES, max_tokens=4)

        answer = await in_thread(call)
        self.assertEqual(answer.choices[0].message.content, "hello there hello there")
        self.assertEqual((answer.usage.prompt_tokens, answer.usage.completion_tokens), (2, 4))
        self.assertEqual(self.tokens("completion"), 4.0)

    async def test_openai_async(self) -> None:
        await self.start()

        async def main() -> Any:
            async with openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key=KEY,
                                          max_retries=0, timeout=10) as client:
                return await asyncio.gather(*[client.chat.completions.create(
                    model="sim-small", messages=MESSAGES) for _ in range(3)])

        answers = await in_thread(lambda: asyncio.run(main()))
        self.assertEqual([a.usage.completion_tokens for a in answers], [6, 6, 6])
        self.assertEqual(self.tokens("completion"), 18.0)

    async def test_openai_stream_without_usage(self) -> None:
        """The SDK sees no usage chunk (none asked for), the gateway still counts."""
        await self.start()

        def call() -> list[Any]:
            return list(self.openai_client().chat.completions.create(
                model="sim-small", messages=MESSAGES, stream=True))

        chunks = await in_thread(call)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        self.assertEqual(text, "hello there hello there hello there")
        self.assertTrue(all(c.usage is None and len(c.choices) == 1 for c in chunks))
        self.assertEqual((self.tokens("prompt"), self.tokens("completion")), (2.0, 6.0))

    async def test_openai_stream_with_usage(self) -> None:
        await self.start()

        def call() -> list[Any]:
            return list(self.openai_client().chat.completions.create(
                model="sim-small", messages=MESSAGES, stream=True,
                stream_options={"include_usage": True}))

        chunks = await in_thread(call)
        last = chunks[-1]
        self.assertEqual(last.choices, [])
        self.assertEqual(last.usage.completion_tokens, 6)
        self.assertEqual(self.tokens("completion"), 6.0)

    async def test_openai_through_ollama_translation(self) -> None:
        """The OpenAI SDK against an Ollama pool (translated), streamed and not."""
        await self.start(translate=True)

        def call() -> tuple[Any, list[Any], list[Any]]:
            client = self.openai_client()
            whole = client.chat.completions.create(model="sim-small", messages=MESSAGES)
            bare = list(client.chat.completions.create(
                model="sim-small", messages=MESSAGES, stream=True))
            chunks = list(client.chat.completions.create(
                model="sim-small", messages=MESSAGES, stream=True,
                stream_options={"include_usage": True}))
            return whole, bare, chunks

        whole, bare, chunks = await in_thread(call)
        self.assertEqual(whole.choices[0].message.content, "hello there hello there hello there")
        self.assertEqual(whole.usage.completion_tokens, 6)
        self.assertTrue(all(c.usage is None for c in bare))
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in bare),
                         "hello there hello there hello there")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.prompt_tokens, 2)
        self.assertEqual(self.tokens("completion"), 18.0)

    async def test_openai_completions_and_embeddings_translated(self) -> None:
        """
        Legacy completions (streamed and not) and embeddings (the SDK asks for
        base64 by default) from the OpenAI SDK, through an Ollama pool.
        """
        await self.start(translate=True)

        def call() -> tuple[Any, list[Any], Any]:
            client = self.openai_client()
            whole = client.completions.create(model="sim-small", prompt="hello there",
                                              max_tokens=4)
            chunks = list(client.completions.create(model="sim-small", prompt="hello there",
                                                    stream=True))
            embedded = client.embeddings.create(model="sim-small", input="hello there")
            return whole, chunks, embedded

        whole, chunks, embedded = await in_thread(call)
        self.assertEqual(whole.choices[0].text, "hello there hello there")
        self.assertEqual(whole.choices[0].finish_reason, "length")
        self.assertEqual("".join(c.choices[0].text for c in chunks),
                         "hello there hello there hello there")
        self.assertEqual(len(embedded.data[0].embedding), 8)
        self.assertAlmostEqual(embedded.data[0].embedding[0], _sim_vector("hello there")[0],
                               places=4)
        self.assertEqual(self.tokens("prompt"), 2.0 + 2.0 + 2.0)

    async def test_models_list(self) -> None:
        await self.start()
        models = await in_thread(lambda: self.openai_client().models.list())
        self.assertIn("sim-small", [m.id for m in models.data])

    async def test_embeddings(self) -> None:
        await self.start()
        answer = await in_thread(lambda: self.openai_client().embeddings.create(
            model="sim-small", input=["hello there", "general kenobi"]))
        self.assertEqual([len(d.embedding) for d in answer.data], [8, 8])
        self.assertEqual(answer.usage.prompt_tokens, 4)
        self.assertEqual(self.tokens("prompt"), 4.0)

    async def test_budget_refusal_is_rate_limit_error(self) -> None:
        await self.start(token_limit="10/minute")
        client = self.openai_client()

        def call() -> Any:
            client.chat.completions.create(model="sim-small", messages=MESSAGES,
                                           max_tokens=50)
            try:
                client.chat.completions.create(model="sim-small", messages=MESSAGES,
                                               max_tokens=50)
            except openai.RateLimitError as e:
                return e
            return None

        error = await in_thread(call)
        self.assertIsInstance(error, openai.RateLimitError)
        self.assertEqual(error.status_code, 429)
        self.assertEqual(error.code, "token_budget_exceeded")
        self.assertIn("token budget", error.message)
        self.assertTrue(error.response.headers.get("retry-after"))

    async def test_unknown_model_is_not_found_error(self) -> None:
        """
        A model no pool serves (routes by model, every pool's models known):
        404 model_not_found, which the SDK raises as NotFoundError; a model
        a pool serves is answered by the same client.
        """
        if openai is None:
            raise SkipTest("the test extra is not installed (pip install -e .[test])")
        h = Harness(self)
        oa = h.simulator("oa", max_tokens=6)
        self.gw = await h.gateway(h.config(
            {"openai": pool(oa, models=["sim-*"])}, routes=[{"path": "/v1/*"}],
            agents={"sdk": {"keys": [hash_key(KEY)]}}))
        client = self.openai_client()

        def call() -> tuple[Any, Any]:
            try:
                client.chat.completions.create(model="no-such-model", messages=MESSAGES)
            except openai.NotFoundError as e:
                error = e
            else:
                error = None
            return error, client.chat.completions.create(model="sim-small", messages=MESSAGES)

        error, answer = await in_thread(call)
        self.assertIsInstance(error, openai.NotFoundError)
        self.assertEqual(error.status_code, 404)
        self.assertEqual(error.code, "model_not_found")
        self.assertIn("no-such-model", error.message)
        self.assertEqual(answer.usage.completion_tokens, 6)
        self.assertEqual(oa.resource.requests_served, 1)

    async def test_ollama_client_pass_through(self) -> None:
        """The official ollama client: chat streamed and not, embed, list."""
        await self.start()

        def call() -> tuple[Any, list[Any], Any]:
            client = ollama.Client(host=self.gw.url, timeout=10,
                                   headers={"Authorization": f"Bearer {KEY}"})
            whole = client.chat(model="sim-small", messages=MESSAGES)
            parts = list(client.chat(model="sim-small", messages=MESSAGES, stream=True))
            embedded = client.embed(model="sim-small", input="hello there")
            return whole, parts, embedded

        whole, parts, embedded = await in_thread(call)
        self.assertEqual(whole.message.content, "hello there hello there hello there")
        self.assertEqual((whole.prompt_eval_count, whole.eval_count), (2, 6))
        self.assertTrue(parts[-1].done)
        self.assertEqual("".join(p.message.content for p in parts),
                         "hello there hello there hello there")
        self.assertEqual(len(embedded.embeddings[0]), 8)
        self.assertEqual(self.tokens("completion"), 12.0)
        self.assertEqual(self.tokens("prompt"), 2.0 + 2.0 + 2.0)
