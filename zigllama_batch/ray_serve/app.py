"""The Serve application: an OpenAI ingress in front of model replicas.

Inside: :func:`build_app`, the builder Serve's own tools call (``serve run
zigllama_batch.ray_serve:build_app model=... num_replicas=2``, or ``import_path`` in a Serve
config file), its arguments :class:`RayAppArgs`, and the ingress deployment
:class:`OpenAIIngress`. Two deployments, as Ray Serve LLM splits its own:

- ``OpenAIIngress`` runs the same Starlette app as ``zigllama-batch serve`` (one code path for
  routes, errors, API key, streaming and metrics) over a
  :class:`~zigllama_batch.ray_serve.remote.RemoteProcessor`. It tokenizes, so the router sees
  token ids. It reserves no CPU: its work is parsing and relaying.
- ``ModelReplica`` owns a processor per replica; its router is
  :class:`~zigllama_batch.ray_serve.router.PrefixAwareRouter` unless ``prefix_routing=false``.

Backpressure follows the batching config: a replica takes up to ``max_batch_size * num_workers
+ max_queue_size`` requests (its processor queues and orders them by priority, then answers 429
with ``Retry-After`` when its queue is full); when every replica is at that bound, up to
``max_queued_requests`` more wait at the ingress, and beyond that the ingress answers 429.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from ..batching.types import BatchConfig, BatchingStrategy
from ..engine.tokenizer import Tokenizer
from ..generation import DEFAULT_ACTIVATIONS, Activations
from ..server.app import DEFAULT_MAX_BODY_BYTES, create_app
from ..server.run import API_KEY_ENV
from .remote import ModelInfo, RemoteProcessor
from .replica import ModelReplica, ReplicaSettings
from .router import PrefixAwareRouter

__all__ = ["OpenAIIngress", "RayAppArgs", "build_app"]

_SERVING = BatchConfig.serving()
"""The batching settings ``zigllama-batch serve`` runs with: the arguments' defaults."""


class RayAppArgs(BaseModel):
    """Arguments of :func:`build_app` (``key=value`` on ``serve run``, ``args:`` in a config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    """A GGUF path or a packaged model's name (on every node); None: the default model."""
    activations: Activations = DEFAULT_ACTIVATIONS
    """What the quantized layers multiply (see :func:`~zigllama_batch.load_model`)."""
    model_name: str | None = None
    """The id clients pass as ``model`` (default: the model's name)."""
    num_replicas: int | Literal["auto"] = Field(default=1)
    """Model replicas, or ``auto`` to autoscale between ``min_replicas`` and ``max_replicas``."""
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    cpus_per_replica: float | None = Field(default=None, gt=0)
    """CPUs Ray reserves per model replica, and its BLAS threads (None: this node's CPUs
    divided among ``num_replicas``, at least 1)."""
    strategy: BatchingStrategy = _SERVING.strategy
    max_batch_size: int = Field(default=_SERVING.max_batch_size, ge=1)
    max_queue_size: int = Field(default=_SERVING.max_queue_size, ge=0)
    max_context: int | None = None
    kv_cache_mb: float | None = Field(default=None, gt=0)
    """Key/value memory of each replica (None: half the memory available after loading)."""
    max_queued_requests: int | None = Field(default=None, ge=-1)
    """Requests that may wait at the ingress when every replica is full (None:
    ``max_queue_size``; -1: no bound)."""
    prefix_routing: bool = True
    """Route by prompt prefix (else Serve's power-of-two choices)."""
    ingress_replicas: int = Field(default=1, ge=1)
    api_key: str | None = None
    """Required as ``Authorization: Bearer`` on /v1 (default: $ZIGLLAMA_BATCH_API_KEY)."""
    drain_timeout: float = Field(default=30.0, ge=0)
    """Seconds a stopping replica lets its running requests finish."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IngressSettings:
    """How the ingress serves."""

    model_name: str | None
    api_key: str | None
    drain_timeout: float
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class OpenAIIngress:
    """The OpenAI-compatible app, in front of the model deployment behind ``model``."""

    async def __init__(  # type: ignore[misc]
        self, model: DeploymentHandle[Any], settings: IngressSettings
    ) -> None:
        # Serve awaits an async constructor; the tokenizer comes from a replica, so the
        # ingress may run on a node that has no copy of the model file.
        info: ModelInfo = await model.describe.remote()
        metadata = await model.tokenizer_metadata.remote()
        tokenizer = await asyncio.to_thread(Tokenizer, metadata)
        self.processor = RemoteProcessor(model, tokenizer, info)
        self.openai_app: Starlette = create_app(
            self.processor,
            model_name=settings.model_name,
            api_key=settings.api_key,
            max_body_bytes=settings.max_body_bytes,
            manage_processor=True,  # the app's lifespan starts it, and drains it on shutdown
            drain_timeout=settings.drain_timeout,
        )

    def __serve_build_asgi_app__(self) -> Starlette:
        """The app Serve's proxy sends HTTP requests to."""
        return self.openai_app


class ModelServer(ModelReplica):
    """A model replica that serves the OpenAI app itself: Serve's proxy routes HTTP straight
    to it (power of two choices), one hop less than through an ingress."""

    async def __init__(  # type: ignore[misc]
        self, settings: ReplicaSettings, ingress: IngressSettings
    ) -> None:
        await super().__init__(settings)
        self.openai_app: Starlette = create_app(
            self.processor,  # started and drained by the replica, not by the app's lifespan
            model_name=ingress.model_name,
            api_key=ingress.api_key,
            max_body_bytes=ingress.max_body_bytes,
        )

    def __serve_build_asgi_app__(self) -> Starlette:
        """The app Serve's proxy sends HTTP requests to."""
        return self.openai_app


def build_app(args: RayAppArgs | dict[str, Any]) -> Application:
    """The Serve application: ``serve run zigllama_batch.ray_serve:build_app key=value ...``.

    Raises:
        pydantic.ValidationError: an argument is unknown or out of range.
        ValueError: the batching settings do not fit together.
    """
    if not isinstance(args, RayAppArgs):
        args = RayAppArgs.model_validate(args)
    config = BatchConfig.serving(
        strategy=args.strategy,
        max_batch_size=args.max_batch_size,
        max_queue_size=args.max_queue_size,
        max_context=args.max_context,
        kv_cache_mb=args.kv_cache_mb,
    )
    fixed = args.num_replicas if isinstance(args.num_replicas, int) else args.min_replicas
    cpus = args.cpus_per_replica or max(1, (os.cpu_count() or 1) // max(1, fixed))
    capacity = config.max_batch_size * config.num_workers + config.max_queue_size
    max_queued = (
        config.max_queue_size if args.max_queued_requests is None else args.max_queued_requests
    )
    settings = ReplicaSettings(
        model=args.model,
        activations=args.activations,
        config=config,
        threads=max(1, int(cpus)),
        drain_timeout=args.drain_timeout,
    )
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus},
        "max_ongoing_requests": capacity,
        "max_queued_requests": max_queued,
        "graceful_shutdown_timeout_s": args.drain_timeout + 5,
        "health_check_period_s": 5,
    }
    if args.num_replicas == "auto":
        options["num_replicas"] = "auto"
        # A replica is busy when its batch is full: scale on ongoing requests per replica.
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=config.max_batch_size,
            upscale_delay_s=10,
            downscale_delay_s=120,  # a replica takes ~10 s to load: do not flap
        )
    else:
        options["num_replicas"] = args.num_replicas
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    ingress_settings = IngressSettings(
        model_name=args.model_name, api_key=api_key, drain_timeout=args.drain_timeout
    )
    if args.num_replicas == 1 or not args.prefix_routing:
        # Nothing to route by prefix: each replica serves HTTP itself.
        server = serve.deployment(name="ModelReplica", **options)(serve.ingress()(ModelServer))
        colocated: Application = server.bind(settings, ingress_settings)
        return colocated
    options["request_router_config"] = {
        "request_router_class": f"{PrefixAwareRouter.__module__}.{PrefixAwareRouter.__name__}",
        "request_router_kwargs": {"imbalance_threshold": max(1, config.max_batch_size // 2)},
    }
    model = serve.deployment(name="ModelReplica", **options)(ModelReplica)
    most_replicas = args.max_replicas if args.num_replicas == "auto" else fixed
    ingress = serve.deployment(
        name="OpenAIIngress",
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        # Never the bottleneck: it holds what all replicas hold, plus its own queue.
        max_ongoing_requests=max(1, most_replicas) * capacity + max(0, max_queued),
    )(serve.ingress()(OpenAIIngress))
    app: Application = ingress.bind(model.bind(settings), ingress_settings)
    return app
