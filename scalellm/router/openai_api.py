"""The OpenAI-compatible front door: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Every request goes to a replica as a streamed ensemble request (Triton's ``generate_stream``), so the router
sees each token's text and log-prob as it comes, retries before the first one, and stops the request in the
engine when the client leaves; non-streamed answers are assembled here. ``usage.prompt_tokens`` counts the
prompt (after the chat template) with the model's tokenizer; ``completion_tokens`` is the engine's count.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .dispatch import Dispatcher, Job, MidStreamFailure, NoReplica, UpstreamRejected
from .openai_protocol import (
    GenerationRequest,
    OpenAIError,
    bad,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    parse_chat,
    parse_completion,
    usage,
)
from .prompt import PromptBuilder
from .upstream import first, flat, parse_sse, sse_events


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    num_output_tokens: int
    log_probs: list[float]

    def tokens(self) -> list[tuple[str, float]]:
        """(text, log-prob) per token of this response; the text goes with its first token."""
        return [(self.text if i == 0 else "", lp) for i, lp in enumerate(self.log_probs)]


def error_response(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def _rejected_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text


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
                web.get("/v1/models", self.models)]

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
            deltas = self._deltas(Job(prompt, prompt_tokens + max_tokens), fields)
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
                    yield Delta(text=text if isinstance(text, str) else "",
                                finish_reason=first(event.get("finish_reason")) or None,
                                num_output_tokens=int(first(event.get("num_output_tokens")) or 0),
                                log_probs=[float(x) for x in flat(event.get("output_log_probs"))])
        except UpstreamRejected as exc:
            raise OpenAIError(exc.status if 400 <= exc.status < 500 else 502, _rejected_message(exc.body)) from None
        except NoReplica as exc:
            raise OpenAIError(503, str(exc)) from None
        except MidStreamFailure as exc:
            raise OpenAIError(502, str(exc)) from None

    async def _whole(self, gen: GenerationRequest, chat: bool, deltas: AsyncGenerator[Delta, None],
                     prompt_tokens: int) -> web.Response:
        text, tokens, finish, completion_tokens = [], [], None, 0
        async with aclosing(deltas):
            async for delta in deltas:
                text.append(delta.text)
                tokens += delta.tokens()
                finish = delta.finish_reason or finish
                completion_tokens = max(completion_tokens, delta.num_output_tokens)
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
            if gen.logprobs:
                choice["logprobs"] = chat_logprobs(tokens)
        else:
            choice["text"] = content
            if gen.logprobs:
                choice["logprobs"] = completion_logprobs(tokens, 0)
        return web.json_response({
            "id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": now(), "model": self.served_model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)})

    async def _stream(self, request: web.Request, gen: GenerationRequest, chat: bool,
                      deltas: AsyncGenerator[Delta, None], prompt_tokens: int) -> web.StreamResponse:
        head = {"id": new_id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": now(), "model": self.served_model}
        response: web.StreamResponse | None = None
        completion_tokens, offset = 0, 0

        async def send(obj: dict[str, Any]) -> None:
            assert response is not None
            await response.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        def chunk(text: str | None, finish: str | None, tokens: list[tuple[str, float]]) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = {"content": text} if text is not None else {}
                if gen.logprobs and tokens:
                    choice["logprobs"] = chat_logprobs(tokens)
            else:
                choice["text"] = text or ""
                if gen.logprobs and tokens:
                    choice["logprobs"] = completion_logprobs(tokens, offset)
            return {**head, "choices": [choice]}

        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    if response is None:  # only now: until the first token the request can still be retried
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                        if chat:
                            await send({**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                   "content": ""},
                                                             "logprobs": None, "finish_reason": None}]})
                    tokens = delta.tokens()
                    if delta.text or tokens or delta.finish_reason:
                        await send(chunk(delta.text or (None if chat else ""), delta.finish_reason, tokens))
                    offset += len(delta.text)
                    completion_tokens = max(completion_tokens, delta.num_output_tokens)
        except OpenAIError as error:
            if response is None:
                return error_response(error)
            await send(error.body())  # the openai SDK raises APIError with this message
        if response is None:
            return error_response(OpenAIError(502, "the replica ended the stream without a response"))
        if gen.include_usage:
            await send({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
