"""The OpenAI-compatible front door: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``.

Every request goes to a replica as a streamed ensemble request (Triton's ``generate_stream``), so the router
sees each token's text and log-prob as it comes, retries before the first one, and stops the request in the
engine when the client leaves; non-streamed answers are assembled here. ``n`` > 1 is the engine's
``num_return_sequences``: each sequence's responses carry its ``sequence_index``, the choice's ``index``.
``usage.prompt_tokens`` counts the prompt (after the chat template) with the model's tokenizer;
``completion_tokens`` is the engine's count, summed over the choices.

Overload: a request the router cannot place (its queue full, or no room in time, or every replica busy) gets
429 in OpenAI's rate-limit shape with ``Retry-After``, which the openai SDKs honour when they retry; no healthy
replica is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .dispatch import Dispatcher, Job, MidStreamFailure, NoReplica, RequestTimeout, UpstreamRejected
from .openai_protocol import (
    GenerationRequest,
    OpenAIError,
    bad,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    openai_finish,
    parse_chat,
    parse_completion,
    rate_limited,
    usage,
)
from .prompt import PromptBuilder
from .slots import Overloaded
from .upstream import error_message, first, flat, parse_sse, sse_events

ALL = -1  # Delta.index of the router's timeout: every choice not finished yet ends


@dataclass
class Delta:
    index: int  # the choice (the engine's sequence_index); ALL: the router's request timeout
    text: str
    finish_reason: str | None  # the engine's
    num_output_tokens: int
    log_probs: list[float]

    def tokens(self) -> list[tuple[str, float]]:
        """(text, log-prob) per token of this response; the text goes with its first token."""
        return [(self.text if i == 0 else "", lp) for i, lp in enumerate(self.log_probs)]


@dataclass
class Choice:
    """One choice of the answer as it builds up."""

    text: list[str] = field(default_factory=list)
    tokens: list[tuple[str, float]] = field(default_factory=list)
    finish: str | None = None  # OpenAI's
    completion_tokens: int = 0
    offset: int = 0  # characters sent so far (completions' logprobs text_offset)


def error_response(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers())


class OpenAIFrontDoor:
    def __init__(self, dispatcher: Dispatcher, prompts: PromptBuilder | None, served_model: str,
                 default_max_tokens: int) -> None:
        self.dispatcher = dispatcher
        self.prompts = prompts
        self.served_model = served_model
        self.default_max_tokens = default_max_tokens
        self.created = now()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.models), web.get("/health", self.health)]

    async def health(self, request: web.Request) -> web.Response:
        """200 while a replica is ready to serve (vLLM's and SGLang's ``/health``), else 503."""
        return web.Response(status=200 if self.dispatcher.any_healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.served_model, "object": "model", "created": self.created, "owned_by": "scalellm"}
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    # ---- one request ----------------------------------------------------------------------------------------
    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            if self.prompts is None:
                raise OpenAIError(503, "the router was started without --model-dir: the OpenAI API needs the "
                                  "model's tokenizer")
            body = await self._body(request)
            gen = parse_chat(body) if chat else parse_completion(body)
            if gen.model != self.served_model:
                raise OpenAIError(404, f"The model `{gen.model}` does not exist (this server has "
                                  f"`{self.served_model}`).", "model", code="model_not_found")
            try:
                prompt = self.prompts.chat(gen.messages or []) if chat else gen.prompt or ""
            except ValueError as exc:
                raise bad(str(exc), "messages") from None
            prompt_tokens = self.prompts.count(prompt)
            max_tokens = self._max_tokens(gen, prompt_tokens, "messages" if chat else "prompt")
            fields: dict[str, Any] = {"text_input": prompt, "max_tokens": max_tokens, "stream": True,
                                      **gen.fields}
            if gen.logprobs:
                fields["return_log_probs"] = True
            deltas = self._deltas(Job.of(prompt, max_tokens, gen.n, prompt_tokens=prompt_tokens), fields)
            if gen.stream:
                return await self._stream(request, gen, chat, deltas, prompt_tokens)
            return await self._whole(gen, chat, deltas, prompt_tokens)
        except OpenAIError as error:
            return error_response(error)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    def _max_tokens(self, gen: GenerationRequest, prompt_tokens: int, prompt_param: str) -> int:
        limit = self.prompts.max_model_len if self.prompts else None
        if limit and prompt_tokens >= limit:
            raise bad(f"the prompt has {prompt_tokens} tokens; the model's context length is {limit}", prompt_param)
        if gen.max_tokens is None:
            return min(self.default_max_tokens, limit - prompt_tokens) if limit else self.default_max_tokens
        if limit and prompt_tokens + gen.max_tokens > limit:
            raise bad(f"max_tokens ({gen.max_tokens}) + the prompt's {prompt_tokens} tokens exceed the model's "
                      f"context length ({limit})", "max_tokens")
        return gen.max_tokens

    async def _deltas(self, job: Job, fields: dict[str, Any]) -> AsyncGenerator[Delta, None]:
        session, spawn, model = self.dispatcher.session, self.dispatcher.spawn, self.dispatcher.config.model_name
        try:
            async with aclosing(self.dispatcher.run(
                    job, lambda up: sse_events(session, up, model, fields, None, spawn))) as events:
                async for raw in events:
                    event = parse_sse(raw)
                    if "error" in event:
                        raise OpenAIError(500, f"the engine failed: {event['error']}")
                    text = first(event.get("text_output"))
                    yield Delta(index=int(first(event.get("sequence_index")) or 0),
                                text=text if isinstance(text, str) else "",
                                finish_reason=first(event.get("finish_reason")) or None,
                                num_output_tokens=int(first(event.get("num_output_tokens")) or 0),
                                log_probs=[float(x) for x in flat(event.get("output_log_probs"))])
        except UpstreamRejected as exc:
            raise OpenAIError(exc.status if 400 <= exc.status < 500 else 502, error_message(exc.body)) from None
        except Overloaded as exc:
            raise rate_limited(str(exc), exc.retry_after_s) from None
        except NoReplica as exc:
            raise OpenAIError(503, str(exc), retry_after_s=exc.retry_after_s) from None
        except MidStreamFailure as exc:
            raise OpenAIError(502, str(exc)) from None
        except RequestTimeout:  # stopped in the engine, as its own deadline would: the text so far is valid
            yield Delta(index=ALL, text="", finish_reason="timeout", num_output_tokens=0, log_probs=[])

    @staticmethod
    def _add(choices: list[Choice], delta: Delta) -> list[int]:
        """Fold ``delta`` into its choice (OpenAI's finish reason, or the ``OpenAIError`` that ends the answer);
        the indices of the choices it finishes."""
        if delta.index == ALL:
            ended = [i for i, c in enumerate(choices) if c.finish is None]
            for i in ended:
                choices[i].finish = openai_finish(delta.finish_reason or "timeout")
            return ended
        choice = choices[delta.index]
        choice.text.append(delta.text)
        choice.tokens += delta.tokens()
        choice.completion_tokens = max(choice.completion_tokens, delta.num_output_tokens)
        if delta.finish_reason:
            choice.finish = openai_finish(delta.finish_reason)
            return [delta.index]
        return []

    async def _whole(self, gen: GenerationRequest, chat: bool, deltas: AsyncGenerator[Delta, None],
                     prompt_tokens: int) -> web.Response:
        choices = [Choice() for _ in range(gen.n)]
        async with aclosing(deltas):
            async for delta in deltas:
                self._add(choices, delta)
        out = []
        for index, c in enumerate(choices):
            content = "".join(c.text)
            choice: dict[str, Any] = {"index": index, "finish_reason": c.finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": content}
                if gen.logprobs:
                    choice["logprobs"] = chat_logprobs(c.tokens)
            else:
                choice["text"] = content
                if gen.logprobs:
                    choice["logprobs"] = completion_logprobs(c.tokens, 0)
            out.append(choice)
        return web.json_response({
            "id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": now(), "model": self.served_model, "choices": out,
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))})

    async def _stream(self, request: web.Request, gen: GenerationRequest, chat: bool,
                      deltas: AsyncGenerator[Delta, None], prompt_tokens: int) -> web.StreamResponse:
        head = {"id": new_id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": now(), "model": self.served_model}
        response: web.StreamResponse | None = None
        choices = [Choice() for _ in range(gen.n)]

        async def send(obj: dict[str, Any]) -> None:
            assert response is not None
            await response.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        def chunk(index: int, text: str | None, finish: str | None, tokens: list[tuple[str, float]]
                  ) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = {"content": text} if text is not None else {}
                if gen.logprobs and tokens:
                    choice["logprobs"] = chat_logprobs(tokens)
            else:
                choice["text"] = text or ""
                if gen.logprobs and tokens:
                    choice["logprobs"] = completion_logprobs(tokens, choices[index].offset)
            return {**head, "choices": [choice]}

        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    if response is None:  # only now: until the first token the request can still be retried
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                        if chat:
                            for index in range(gen.n):
                                await send({**head, "choices": [{"index": index, "delta": {"role": "assistant",
                                                                                           "content": ""},
                                                                 "logprobs": None, "finish_reason": None}]})
                    ended = self._add(choices, delta)
                    if delta.index == ALL:
                        for index in ended:
                            await send(chunk(index, None if chat else "", choices[index].finish, []))
                        continue
                    tokens = delta.tokens()
                    if delta.text or tokens or ended:
                        finish = choices[delta.index].finish if ended else None
                        await send(chunk(delta.index, delta.text or (None if chat else ""), finish, tokens))
                    choices[delta.index].offset += len(delta.text)
        except OpenAIError as error:
            if response is None:
                return error_response(error)
            await send(error.body())  # the openai SDK raises APIError with this message
        if response is None:
            return error_response(OpenAIError(502, "the replica ended the stream without a response"))
        if gen.include_usage:
            await send({**head, "choices": [],
                        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
