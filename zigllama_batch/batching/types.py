"""The batch processor's public data types: what a caller configures, sends and gets back.

Inside: :class:`BatchingStrategy`, :class:`BatchConfig`, :class:`BatchRequest`,
:class:`StreamChunk`, :class:`RequestTimeline`, :class:`BatchResult`, :class:`Percentiles` and
:class:`BatchStats` (plain frozen values; nothing here runs; stats print as a few readable
lines), and :class:`EngineLike`, what a processor needs of the engine it is given.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from ..engine.runner import DEFAULT_PREFILL_CHUNK
from ..engine.step import SequenceStep, TokenSample
from ..engine.tokenizer import Tokenizer
from ..errors import InvalidRequest
from ..generation import FinishReason, GenerationConfig, GenerationResult, Prompt, TokenLogprob
from ..kv import KVEngine
from ..structured import StructuredOutput

__all__ = [
    "BatchConfig",
    "BatchRequest",
    "BatchResult",
    "BatchStats",
    "BatchingStrategy",
    "EngineLike",
    "Percentiles",
    "RequestId",
    "RequestTimeline",
    "StreamChunk",
    "TokenCallback",
]

RequestId = int | str
"""A request's id: given by the caller, or a counter the processor assigns."""

MAX_PRIORITY = 1_000_000
"""Largest priority magnitude a request may have."""


class BatchingStrategy(enum.StrEnum):
    """How requests are grouped into batches (the strings are accepted wherever a strategy is)."""

    FIXED_SIZE = "fixed_size"
    """Start when ``max_batch_size`` requests wait (a partial batch only when draining); the
    batch runs until all of its sequences finish, nobody joins."""
    DYNAMIC_TIMEOUT = "dynamic_timeout"
    """Start when the batch is full or the oldest waiting request has waited ``timeout_ms``;
    nobody joins a running batch."""
    ADAPTIVE = "adaptive"
    """Start when waiting longer would miss ``latency_target_ms``, judged from measured step
    costs; the batch size follows queue pressure; nobody joins a running batch."""
    CONTINUOUS = "continuous"
    """Every step admits waiting requests into free slots (prompt chunks within a per-step token
    budget); finished sequences leave at once."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchConfig:
    """How a :class:`~zigllama_batch.BatchProcessor` batches, bounds and times requests.

    Strategies are also accepted as strings (``"continuous"``). Invalid values raise
    ``ValueError`` naming the field.
    """

    max_batch_size: int = 32
    """Most sequences one worker runs in a step; 32 is where CPU decode throughput levels off."""
    strategy: BatchingStrategy = BatchingStrategy.DYNAMIC_TIMEOUT
    """How batches form (see :class:`BatchingStrategy`)."""
    timeout_ms: float = 100.0
    """DYNAMIC_TIMEOUT: longest a request waits for its batch to fill."""
    num_workers: int = 1
    """Batches run at once, each with its own cache slots; their steps take turns (every step
    of a process runs in one thread, on all cores). More than one lets a static strategy start
    a new batch while another still runs."""
    max_queue_size: int = 1024
    """Requests allowed to wait; one more raises QueueFull at once."""
    latency_target_ms: float = 5000.0
    """ADAPTIVE: end-to-end latency each request should stay under."""
    max_step_tokens: int = 512
    """Most new tokens in one step (decode tokens plus prompt chunks): bounds how long one step,
    and so one inter-token gap of running streams, can take."""
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    """Most prompt tokens one sequence feeds in a step; long prompts are split into chunks
    (the same default as :class:`~zigllama_batch.TextGenerator`'s)."""
    priority_aging_ms: float = 1000.0
    """Every this many milliseconds of waiting counts as one priority level better, so low
    priorities cannot starve; 0 disables aging."""
    request_timeout_ms: float | None = None
    """Default deadline of a request (its own ``timeout_ms`` wins); None means no deadline."""
    max_context: int | None = None
    """Positions per cache slot (prompt plus output); None: min(2048, the model's context)."""
    result_retention: int = 1024
    """Finished outcomes of ``submit_async`` requests kept until read; beyond this many unread,
    the oldest are dropped."""
    prefix_cache: bool = True
    """Start a request after the longest prefix of its prompt whose keys and values a cache
    slot already holds (a shared system prompt, the earlier turns of a chat): on, because on a
    CPU recomputing a prompt costs far more than copying its rows."""
    prefix_cache_mb: float = 256.0
    """Host memory for prefixes evicted from the cache slots, kept for later requests (least
    recently used ones go first); 256 MiB holds ~5,800 tokens of SmolLM2-135M. 0: no pool.
    Taken from ``kv_cache_mb``, of which it gets at most a quarter."""
    speculative_tokens: int = 0
    """Most drafted tokens a decoding sequence verifies in one step (speculative decoding with
    prompt lookup: tokens that followed the sequence's current ending earlier in its prompt or
    output). Output is the same as without; work that copies from its context takes fewer
    steps. 0 turns it off."""
    speculative_max_batch: int = 4
    """Drafting happens only while at most this many sequences decode in a batch: verifying
    drafts adds rows to a step, nearly free for a few sequences, not for many."""
    kv_cache_mb: float | None = None
    """All key/value memory: running sequences, prefixes kept for reuse and the pool together.
    A request is admitted when its prompt fits; when running sequences outgrow it, the lowest
    priority, most recently admitted one is preempted and recomputed later. None: half the
    memory available when the processor is made (after the weights), as
    :func:`~zigllama_batch.kv.default_budget_bytes` says."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "strategy", BatchingStrategy(self.strategy))
        except ValueError:
            names = ", ".join(s.value for s in BatchingStrategy)
            raise ValueError(f"strategy: must be one of {names}, got {self.strategy!r}") from None
        _positive_int("max_batch_size", self.max_batch_size, maximum=4096)
        _positive_int("num_workers", self.num_workers, maximum=64)
        _positive_int("max_queue_size", self.max_queue_size)
        _positive_int("max_step_tokens", self.max_step_tokens)
        _positive_int("prefill_chunk", self.prefill_chunk)
        _non_negative_int("speculative_tokens", self.speculative_tokens, maximum=64)
        _positive_int("speculative_max_batch", self.speculative_max_batch)
        _non_negative("prefix_cache_mb", self.prefix_cache_mb)
        if self.kv_cache_mb is not None:
            _non_negative("kv_cache_mb", self.kv_cache_mb, strict=True)
        _non_negative("timeout_ms", self.timeout_ms)
        _non_negative("priority_aging_ms", self.priority_aging_ms)
        _non_negative("latency_target_ms", self.latency_target_ms, strict=True)
        if self.request_timeout_ms is not None:
            _non_negative("request_timeout_ms", self.request_timeout_ms, strict=True)
        if self.max_context is not None and (
            not isinstance(self.max_context, int) or self.max_context < 2
        ):
            raise ValueError(f"max_context: must be an int >= 2 or None, got {self.max_context!r}")
        if (
            isinstance(self.result_retention, bool)
            or not isinstance(self.result_retention, int)
            or self.result_retention < 0
        ):
            raise ValueError(
                f"result_retention: must be an int >= 0, got {self.result_retention!r}"
            )
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(
                f"max_step_tokens: every running sequence feeds at least one token per step, so "
                f"the budget must be at least max_batch_size ({self.max_batch_size}), got "
                f"{self.max_step_tokens}"
            )
        if (
            self.strategy is BatchingStrategy.FIXED_SIZE
            and self.max_queue_size < self.max_batch_size
        ):
            raise ValueError(
                f"max_queue_size: FIXED_SIZE waits for {self.max_batch_size} queued requests, so "
                f"the queue must hold at least that many, got {self.max_queue_size}"
            )

    @classmethod
    def serving(cls, **fields: Any) -> BatchConfig:
        """The settings ``zigllama-batch serve``, the demo and the Ray app start from (and show
        as their flags' defaults), with ``fields`` changed: continuous batching, and a per-step
        token budget that grows with ``max_batch_size`` when none is given (every running
        sequence feeds at least one token a step, so any batch size the config allows runs).

        Raises:
            ValueError: as the constructor, naming the field.
        """
        library = cls()
        fields.setdefault("strategy", BatchingStrategy.CONTINUOUS)
        batch = fields.get("max_batch_size", library.max_batch_size)
        if "max_step_tokens" not in fields and isinstance(batch, int):
            fields["max_step_tokens"] = max(library.max_step_tokens, batch)
        return cls(**fields)


TokenCallback = Callable[["StreamChunk", RequestId], Any]
"""Called with ``(chunk, request_id)`` for every generated token; may be ``async``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRequest:
    """One generation request for the processor.

    ``prompt`` is text, a list of chat messages (rendered with the model's chat template), or a
    list of token ids.
    ``priority``: lower is served first; equal priorities are first come, first served.
    """

    prompt: Prompt
    config: GenerationConfig = field(default_factory=GenerationConfig)
    priority: int = 0
    callback: TokenCallback | None = None
    id: RequestId | None = None
    """Assigned by the processor when None; an id already in use by a live request is refused."""
    timeout_ms: float | None = None
    """Deadline from submission; None uses ``BatchConfig.request_timeout_ms``."""
    cache_salt: str | None = None
    """Requests share cached prompt prefixes only with requests of the same salt (one per
    tenant, say); None shares with every other request without a salt."""

    def __post_init__(self) -> None:
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise InvalidRequest(f"cache_salt: must be a str, got {self.cache_salt!r}")
        if not isinstance(self.config, GenerationConfig):
            raise InvalidRequest(
                f"config: must be a GenerationConfig, got {type(self.config).__name__}"
            )
        if (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or abs(self.priority) > MAX_PRIORITY
        ):
            raise InvalidRequest(
                f"priority: must be an int in [-{MAX_PRIORITY}, {MAX_PRIORITY}], "
                f"got {self.priority!r}"
            )
        if self.callback is not None and not callable(self.callback):
            raise InvalidRequest("callback: must be callable")
        if self.id is not None and not is_request_id(self.id):
            raise InvalidRequest(f"id: must be an int or str, got {self.id!r}")
        if self.timeout_ms is not None:
            try:
                _non_negative("timeout_ms", self.timeout_ms, strict=True)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        if not isinstance(self.prompt, str) and not isinstance(self.prompt, list | tuple):
            raise InvalidRequest("prompt: must be a str, a list of chat messages or of token ids")


def is_request_id(value: object) -> bool:
    """True for a usable request id (an int or a str)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """The text one generated token adds (possibly empty while a character or a possible stop
    string is held back), the token's id, and the finish reason on the last chunk."""

    text: str
    token_id: int
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    """The token's log-probability, when the request asked for logprobs."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """On a request's first chunk, when it asked for them: the prompt's logprobs (as
    :attr:`GenerationResult.prompt_logprobs`); None on every other chunk."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestTimeline:
    """When things happened to a request (processor clock, seconds) and the steps it ran in."""

    submitted: float
    admitted: float
    """When it got a cache slot (left the queue)."""
    first_token: float
    finished: float
    steps: int
    """Engine steps that included this request."""
    batch_sizes: tuple[int, ...]
    """Sequences in each of those steps."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchResult:
    """The outcome of one request, with its timing."""

    id: RequestId
    result: GenerationResult
    latency_ms: float
    """Submission to last token."""
    queue_time_ms: float
    """Submission to admission into a batch."""
    time_to_first_token_ms: float
    """Submission to first generated token."""
    batch_size: int
    """Most sequences in any step this request ran in."""
    timeline: RequestTimeline

    @property
    def text(self) -> str:
        """The generated text (shortcut for ``result.text``)."""
        return self.result.text


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50 / p90 / p99 and mean of recent observations (zeros before any)."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    mean: float = 0.0
    count: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchStats:
    """A consistent snapshot of a processor's counters and distributions.

    ``print(stats)`` gives a multi-line :meth:`summary`; ``repr(stats)`` one line of the
    counts; :meth:`as_dict` plain JSON-serialisable data (for logs and metrics endpoints).
    Percentiles cover the most recent 10,000 observations of each kind; counts the whole life.
    """

    total_requests: int
    """Requests accepted (queued) since start."""
    total_tokens: int
    """Tokens generated since start (by every request, whatever its outcome)."""
    avg_latency_ms: float
    """Mean latency of completed requests."""
    avg_throughput_tps: float
    """Generated tokens per second since the first request was accepted (up to the last finish
    when idle)."""
    completed: int
    """Requests that finished generating (stop or length)."""
    failed: int
    """Ended by an error: engine, callback or stop without drain."""
    cancelled: int
    """Cancelled by the caller (``cancel()``, a cancelled ``submit()``, a closed stream)."""
    timed_out: int
    """Ended by their deadline."""
    rejected: int
    """Refused at submission (queue full, or submitted after close)."""
    queue_depth: int
    """Requests waiting now."""
    running: int
    """Sequences holding a cache slot now."""
    steps: int
    """Engine steps run."""
    latency_ms: Percentiles
    """Submission to last token, of completed requests."""
    queue_time_ms: Percentiles
    """Submission to admission into a batch, of completed requests."""
    time_to_first_token_ms: Percentiles
    """Submission to first generated token, of completed requests."""
    step_time_ms: Percentiles
    """Duration of one engine step."""
    mean_batch_size: float
    """Mean sequences per step."""
    batch_size_histogram: Mapping[int, int]
    """Steps by number of sequences in them."""
    prefix_cache_queries: int = 0
    """Prompt tokens of admitted requests looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose keys and values were reused instead of computed."""
    prefix_pool_bytes: int = 0
    """Host memory held by the pool of prefixes evicted from the cache slots."""
    prefix_pool_evictions: int = 0
    """Pool blocks of 16 positions dropped (least recently used leaves first) to make room under
    ``prefix_cache_mb``."""
    preemptions: int = 0
    """Running sequences preempted (their slot taken back when memory ran short; recomputed
    when admitted again)."""
    draft_tokens: int = 0
    """Drafted tokens verified (speculative decoding, ``BatchConfig.speculative_tokens``)."""
    accepted_draft_tokens: int = 0
    """Of those, the ones accepted: tokens generated without a step of their own."""
    kv_cache_tokens: int = 0
    """Positions of keys and values held now: running sequences, and prefixes kept for reuse."""
    kv_cache_budget_tokens: int = 0
    """Positions ``kv_cache_mb`` holds in cache slots (the pool's share apart)."""
    kv_cache_usage: float = 0.0
    """Share of ``kv_cache_mb`` in use now (slots and pool), 0 to 1."""
    invalid: int = 0
    """Ended by their own input, found only as they ran: an output constraint that could not be
    continued (:class:`~zigllama_batch.ConstraintFailed`)."""
    slow_callbacks: int = 0
    """Calls of plain (not ``async def``) token callbacks that held the event loop for more
    than 100 ms: every stream of the processor waited for each of them."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the prefix cache (0 before any)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @property
    def finished(self) -> int:
        """Requests that have ended, by any outcome."""
        return self.completed + self.failed + self.invalid + self.cancelled + self.timed_out

    def as_dict(self) -> dict[str, Any]:
        """Every field and ``finished`` as plain data that ``json.dumps`` takes and gives back
        unchanged: percentiles as ``{"p50", "p90", "p99", "mean", "count"}`` dicts, the
        histogram's keys as strings (as JSON objects have them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in out.items():
            if isinstance(value, Percentiles):
                out[name] = asdict(value)
        out["batch_size_histogram"] = {str(k): v for k, v in self.batch_size_histogram.items()}
        out["finished"] = self.finished
        out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return out

    def summary(self) -> str:
        """A few lines for a terminal or a log: outcomes, what is queued and running now,
        throughput, batch sizes and the latency percentiles."""
        histogram = sorted(self.batch_size_histogram.items())
        if len(histogram) > _HISTOGRAM_SHOWN:  # the most frequent sizes, in size order
            histogram = sorted(sorted(histogram, key=lambda kv: -kv[1])[:_HISTOGRAM_SHOWN])
        sizes = " ".join(f"{size}:{steps}" for size, steps in histogram) or "-"
        more = len(self.batch_size_histogram) - len(histogram)
        sizes += f" (+{more} more sizes)" if more else ""
        rows = [
            (
                "requests",
                f"{self.total_requests} accepted: {self.completed} completed, {self.failed} "
                f"failed, {self.invalid} invalid, {self.cancelled} cancelled, {self.timed_out} "
                f"timed out; {self.rejected} rejected",
            ),
            ("now", f"{self.queue_depth} queued, {self.running} running"),
            (
                "tokens",
                f"{self.total_tokens} generated, {self.avg_throughput_tps:.1f} tokens/s",
            ),
            ("steps", f"{self.steps}, mean batch size {self.mean_batch_size:.1f}"),
            ("steps by size", sizes),
            (
                "prefix cache",
                f"{self.prefix_cache_hits} of {self.prefix_cache_queries} prompt tokens reused "
                f"({self.prefix_cache_hit_rate:.0%}); pool {self.prefix_pool_bytes / 2**20:.1f} "
                f"MiB, {self.prefix_pool_evictions} evicted",
            ),
            ("latency", _percentiles(self.latency_ms)),
            ("queue time", _percentiles(self.queue_time_ms)),
            ("first token", _percentiles(self.time_to_first_token_ms)),
            ("step time", _percentiles(self.step_time_ms)),
        ]
        width = max(len(name) for name, _ in rows)
        return "BatchStats\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"<BatchStats requests={self.total_requests} completed={self.completed} "
            f"failed={self.failed} invalid={self.invalid} cancelled={self.cancelled} "
            f"timed_out={self.timed_out} "
            f"rejected={self.rejected} queued={self.queue_depth} running={self.running} "
            f"tokens={self.total_tokens} steps={self.steps} "
            f"latency_p50_ms={self.latency_ms.p50:.0f}>"
        )


_HISTOGRAM_SHOWN = 8
"""Batch sizes a summary lists; the rest are counted (a processor of batch size 32 can have run
32 different sizes)."""


def _percentiles(p: Percentiles) -> str:
    if not p.count:
        return "-"
    return (
        f"p50 {_ms(p.p50)} / p90 {_ms(p.p90)} / p99 {_ms(p.p99)} ms "
        f"(mean {_ms(p.mean)}, n={p.count})"
    )


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


class EngineLike(KVEngine, Protocol):
    """What the scheduler needs from an engine (:class:`~zigllama_batch.engine.Engine` has it):
    what the KV manager needs (slots, the pool's storage, pages given back), and the step."""

    tokenizer: Tokenizer

    @property
    def model_name(self) -> str:
        """The model's name, for display and the server's model id."""
        ...

    def new_sampling(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> Any:
        """Per-sequence sampling state (random stream, penalty counts)."""
        ...

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        """Run one forward pass over ``items``; the sampled token per item, or None."""
        ...

    def check_structured(self, structured: StructuredOutput) -> None:
        """Compile an output constraint (may take milliseconds: called off the event loop);
        raises InvalidRequest when it does not compile."""
        ...


def _positive_int(name: str, value: object, *, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be at most {maximum}, got {value}")


def _non_negative_int(name: str, value: object, *, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{name}: must be an int from 0 to {maximum}, got {value!r}")


def _non_negative(name: str, value: object, *, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if not ok or value < 0 or (strict and value == 0) or value == float("inf"):  # type: ignore[operator]
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{name}: must be a finite number {bound}, got {value!r}")
