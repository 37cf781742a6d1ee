"""``POST /v1/chat/completions``: a conversation answered by the assistant, or with a tool call.

Inside: :class:`ChatCompletions`, the adapter (messages and tools to a request, see
:mod:`.tools`), and its turns: free text (``message.content``, per-token logprobs in the chat
shape), a constrained tool call (``tool_choice`` required or named: ``message.tool_calls``,
streamed as tool-call deltas), and ``auto`` (text, then any calls the model wrote in tags).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..batching.types import BatchResult, StreamChunk
from ..engine.tokenizer import Tokenizer
from ..generation import FinishReason
from .backend import ChunkStream
from .choices import ChoiceTurn, prepare_sampling
from .core import Core, token_logprob
from .schema import ChatCompletionRequest
from .tools import (
    TaggedCallStream,
    ToolCallDeltas,
    ToolPlan,
    complete,
    tagged_calls,
    tool_calls,
    with_tools,
)

__all__ = ["ChatCompletions", "tool_finish"]


class ChatCompletions:
    """The adapter of ``POST /v1/chat/completions``."""

    schema = ChatCompletionRequest
    prompt_param = "messages"

    def __init__(self, core: Core) -> None:
        self.core = core

    async def prepare(self, body: ChatCompletionRequest) -> ChoiceTurn:
        """The request the body asks for."""
        core = self.core
        processor = core.processor
        plan = body.tool_plan(template_calls=processor.tokenizer.calls_tools_in_tags)
        messages = body.message_dicts()
        if plan is None:
            prompt_ids = processor.encode_prompt(messages)
        elif plan.via_template:
            prompt_ids = processor.encode_prompt(messages, tools=plan.template_tools())
        else:
            prompt_ids = processor.encode_prompt(with_tools(messages, plan))
        request, constraint = await prepare_sampling(
            core,
            body,
            prompt_ids,
            id_prefix="chatcmpl",
            structured=plan.structured if plan is not None else None,
            constraint=_tool_field(body, plan) if plan is not None else None,
        )
        turn = _ChatTurn if plan is None else _AutoToolTurn if plan.auto else _ToolCallTurn
        return turn(
            request,
            body,
            model=core.model_name,
            prompt_param=self.prompt_param,
            constraint=constraint,
            tokenizer=processor.tokenizer,
            plan=plan,
        )


def tool_finish(reason: FinishReason | None, whole: bool) -> str:
    """OpenAI's finish reason of a tool-call answer: ``tool_calls`` when the call is whole
    (a stop string or stop token may have cut it short: then ``stop``)."""
    return "tool_calls" if reason == FinishReason.STOP and whole else str(reason)


def _tool_field(body: ChatCompletionRequest, plan: ToolPlan) -> str:
    """The field a tool call's constraint comes from: the named function's parameters, or
    ``tools`` when any tool may be called."""
    names = [t.function.name if t.function else None for t in body.tools or ()]
    if plan.named is not None and plan.named in names:
        return f"tools[{names.index(plan.named)}].function.parameters"
    return "tools"


def _choice(
    delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


class _ChatTurn(ChoiceTurn):
    """Free text: the assistant's message."""

    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"

    def __init__(
        self, *args: Any, tokenizer: Tokenizer, plan: ToolPlan | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
        self.plan = plan

    def message(self, result: BatchResult) -> tuple[dict[str, Any], str]:
        """The answer's message and finish reason."""
        r = result.result
        return {"role": "assistant", "content": r.text, "refusal": None}, str(r.finish_reason)

    def choice(self, result: BatchResult) -> dict[str, Any]:
        r = result.result
        logprobs = None
        if r.logprobs is not None:
            content = [
                token_logprob(self.tokenizer, t, lp)
                for t, lp in zip(r.token_ids, r.logprobs, strict=True)
            ]
            logprobs = {"content": content, "refusal": None}
        message, finish = self.message(result)
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}

    async def deltas(self, chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
        yield _choice({"role": "assistant", "content": ""})
        async for chunk in self._sendable(chunks):
            logprobs = None
            if chunk.logprob is not None:
                logprobs = {
                    "content": [token_logprob(self.tokenizer, chunk.token_id, chunk.logprob)],
                    "refusal": None,
                }
            finish = str(chunk.finish_reason) if chunk.finish_reason is not None else None
            yield _choice({"content": chunk.text} if chunk.text else {}, finish, logprobs)

    async def _sendable(self, chunks: ChunkStream) -> AsyncIterator[StreamChunk]:
        """The chunks that carry something (counting every one)."""
        async for chunk in chunks:
            self.generated += 1
            if not chunk.text and chunk.finish_reason is None and chunk.logprob is None:
                continue  # text held back (partial character or possible stop string)
            yield chunk


class _ToolCallTurn(_ChatTurn):
    """``tool_choice`` required or named: the answer is one call, constrained."""

    def message(self, result: BatchResult) -> tuple[dict[str, Any], str]:
        assert self.plan is not None
        message, finish = super().message(result)
        r = result.result
        if (calls := tool_calls(self.plan, r.text)) is not None:
            message = {**message, "content": None, "tool_calls": calls}
            finish = tool_finish(r.finish_reason, complete(self.plan, r.text))
        return message, finish

    async def deltas(self, chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
        assert self.plan is not None
        calls = ToolCallDeltas(self.plan)
        yield _choice({"role": "assistant", "content": ""})
        async for chunk in self._sendable(chunks):
            done = chunk.finish_reason is not None
            deltas = calls.feed(chunk.text, final=done)
            if deltas or done:
                finish = tool_finish(chunk.finish_reason, calls.whole) if done else None
                yield _choice({"tool_calls": deltas} if deltas else {}, finish)


class _AutoToolTurn(_ChatTurn):
    """``tool_choice`` auto: text, and any calls the model wrote in tags."""

    def message(self, result: BatchResult) -> tuple[dict[str, Any], str]:
        assert self.plan is not None
        message, finish = super().message(result)
        r = result.result
        head, found = tagged_calls(self.plan, r.text)
        if found:
            message = {**message, "content": head or None, "tool_calls": found}
            finish = tool_finish(r.finish_reason, True)
        return message, finish

    async def deltas(self, chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
        assert self.plan is not None
        tagged = TaggedCallStream(self.plan)
        yield _choice({"role": "assistant", "content": ""})
        async for chunk in self._sendable(chunks):
            if text := tagged.feed(chunk.text):
                yield _choice({"content": text})
            if chunk.finish_reason is None:
                continue
            rest, deltas = tagged.finish()
            if rest:
                yield _choice({"content": rest})
            reason = str(chunk.finish_reason)
            if deltas:
                yield _choice({"tool_calls": deltas})
                reason = tool_finish(chunk.finish_reason, True)
            yield _choice({}, reason)
