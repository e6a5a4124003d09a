"""``cacheservice proxy --upstream URL``: an OpenAI-compatible front that plans prompts.

Agent frameworks and RAG apps that speak the chat-completions API get planning without code
changes. A ``POST /v1/chat/completions`` whose body carries the extension field
``"cacheservice": {"movable": [i, ...], "droppable": [i, ...], "ranks": [r, ...], "blend":
bool}`` (message indices; the field is removed before forwarding) is split into one segment
per message with the upstream model's own tokenizer and chat template, planned by the service
(/v1/plan: what is cached, in which order), and forwarded with its messages in the planned
order, duplicates left out; with ``blend`` the chunk hits' token spans go to the blend
connector as ``kv_transfer_params: {"chunks": [[start, end], ...]}``. The plan is echoed in
the ``x-cacheservice-plan`` response header.

Everything else passes through untouched, byte for byte, streaming included: other paths, a
body without hints (nothing may move), and anything unplannable — malformed JSON, non-text
content, a chat template whose rendering of a conversation is not the rendering of its first
messages followed by the rest, an unknown model, or a service that is down. Upstream errors
come back as the upstream sent them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from cacheservice.aclient import AsyncCacheClient
from cacheservice.errors import CacheServiceError
from index.planner import DROPPABLE, FIXED, MOVABLE, Segment

log = logging.getLogger("cacheservice.proxy")
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
       "host", "upgrade", "proxy-connection", "te", "trailer"}  # fmt: skip


@dataclass(frozen=True)
class ProxyConfig:
    upstream: str
    service_url: str
    token: str | None = None
    tokenizer: str | None = None  # name or path; default: the request's model
    timeout_s: float = 600.0


class Segmenter:
    """One tokenizer per model: messages -> one token segment per message, plus the
    generation prompt, such that their concatenation is the prompt the upstream renders."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer  # the proxy's only use of transformers

        self.tok = AutoTokenizer.from_pretrained(name_or_path)

    def _render(self, messages: list[dict], gen: bool) -> list[int]:
        # As vLLM's chat endpoint does: render the template to text, tokenize the text
        # without adding special tokens (the template wrote them).
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def segments(self, messages: list[dict]) -> list[np.ndarray] | None:
        full = self._render(messages, gen=True)
        bounds = [0]
        for i in range(1, len(messages) + 1):
            part = self._render(messages[:i], gen=False)
            if full[: len(part)] != part or len(part) < bounds[-1]:
                return None  # the template is not prefix-stable: nothing can be planned
            bounds.append(len(part))
        bounds.append(len(full))
        return [np.asarray(full[a:b], dtype=np.uint32) for a, b in pairwise(bounds)]


def _hints(body: dict, n: int) -> dict | None:
    hints = body.get("cacheservice")
    if not isinstance(hints, dict):
        return None
    out = {"movable": set(), "droppable": set(), "ranks": None, "blend": False}
    for key in ("movable", "droppable"):
        value = hints.get(key, [])
        if not isinstance(value, list) or not all(isinstance(i, int) and 0 <= i < n for i in value):
            return None
        out[key] = set(value)
    ranks = hints.get("ranks")
    if ranks is not None and (not isinstance(ranks, list) or len(ranks) != n):
        return None
    out["ranks"], out["blend"] = ranks, bool(hints.get("blend", False))
    return out


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.client = AsyncCacheClient(config.service_url, config.token, timeout=2.0)
        self._segmenters: dict[str, Segmenter | None] = {}
        self._session: ClientSession | None = None

    def session(self) -> ClientSession:
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=self.config.timeout_s),
                                          auto_decompress=False)  # fmt: skip
        return self._session

    async def close(self) -> None:
        await self.client.close()
        if self._session is not None:
            await self._session.close()

    def segmenter(self, model: str) -> Segmenter | None:
        name = self.config.tokenizer or model
        if name not in self._segmenters:
            try:
                self._segmenters[name] = Segmenter(name)
            except Exception as e:  # no such model or tokenizer: requests pass through
                log.warning("no tokenizer for %r (%s): its requests pass through", name, e)
                self._segmenters[name] = None
        return self._segmenters[name]

    async def namespace(self, model: str) -> str | None:
        """The namespace the upstream's connector registered for ``model``."""
        try:
            known = await self.client.namespaces()
        except CacheServiceError:
            return None
        names = [n for n in known if n["model"].split("#w")[0] == model]
        return names[0]["id"] if len(names) == 1 else None

    async def plan_body(self, body: dict) -> tuple[dict, dict] | None:
        """The body to forward and the plan summary; None: pass the request through."""
        messages, model = body.get("messages"), body.get("model")
        if not isinstance(messages, list) or not isinstance(model, str) or not messages:
            return None
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return None
        hints = _hints(body, len(messages))
        if hints is None:
            return None
        segmenter = self.segmenter(model)
        ns = await self.namespace(model)
        if segmenter is None or ns is None:
            return None
        parts = segmenter.segments(messages)
        if parts is None:
            return None
        segs = []
        for i, tokens in enumerate(parts):
            kind = FIXED
            if i < len(messages) and i in hints["droppable"]:
                kind = DROPPABLE
            elif i < len(messages) and i in hints["movable"]:
                kind = MOVABLE
            rank = hints["ranks"][i] if hints["ranks"] and i < len(messages) else None
            segs.append(Segment(tokens, kind, rank if isinstance(rank, int) else None))
        try:
            plan = await self.client.plan(ns, segs)
        except CacheServiceError as e:
            log.info("planning failed (%s): request passes through", e)
            return None
        out = {k: v for k, v in body.items() if k != "cacheservice"}
        out["messages"] = [messages[i] for i in plan.order if i < len(messages)]
        summary = {"order": [i for i in plan.order if i < len(messages)],
                   "dropped": plan.dropped, "prefix_tokens": plan.prefix_tokens,
                   "chunk_tokens": plan.chunk_tokens}  # fmt: skip
        if hints["blend"]:
            spans = [[s.start, s.start + s.num_tokens] for s in plan.segments
                     if s.source == "chunk"]  # fmt: skip
            if spans:
                params = dict(out.get("kv_transfer_params") or {})
                out["kv_transfer_params"] = params | {"chunks": spans}
        return out, summary

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        extra_headers = {}
        if request.method == "POST" and request.path == "/v1/chat/completions":
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            try:
                planned = await self.plan_body(body) if isinstance(body, dict) else None
            except Exception:  # planning is an optimisation: never the reason a request fails
                log.exception("planning failed: the request passes through")
                planned = None
            if planned is not None:
                raw = json.dumps(planned[0]).encode()
                extra_headers["x-cacheservice-plan"] = json.dumps(planned[1])
        return await self.forward(request, raw, extra_headers)

    async def forward(self, request: web.Request, raw: bytes, extra: dict) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        url = self.config.upstream.rstrip("/") + request.path_qs
        try:
            return await self._relay(request, url, raw, headers, extra)
        except (ClientError, TimeoutError) as e:
            return web.json_response(
                {"error": {"message": f"upstream {self.config.upstream} failed: {e}",
                           "type": "bad_gateway"}}, status=502)  # fmt: skip

    async def _relay(self, request, url: str, raw: bytes, headers: dict, extra: dict):
        async with self.session().request(request.method, url, data=raw, headers=headers) as up:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    response.headers.add(k, v)
            for k, v in extra.items():
                response.headers[k] = v
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


PROXY_KEY = web.AppKey("proxy", Proxy)


def create_proxy_app(config: ProxyConfig) -> web.Application:
    app = web.Application(client_max_size=64 << 20)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[PROXY_KEY] = Proxy(config)
        yield
        await app[PROXY_KEY].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY_KEY].handle(request)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
