"""PrefixAwareRouter: a Ray Serve request router that sends a prompt where its prefix is warm.

Serve calls :meth:`PrefixAwareRouter.choose_replicas` for every request to the model deployment.
The request's token ids (the ingress tokenized it) are matched against a
:class:`~zigllama_batch.ray_serve.prefix_index.PrefixIndex` of what each replica was sent. When
some replica holds at least ``min_match_tokens`` of the prompt as a prefix, and its load (Serve's
count of its ongoing requests) is within ``imbalance_threshold`` of the least loaded candidate,
the replicas with the longest match are ranked first and the rest after them (Serve takes the
least loaded of a rank that has room, so a full warm replica falls back to a cold one).
Otherwise two random candidates are offered and the less loaded wins (power of two choices,
Serve's default). Matching is on token ids, so two prompts that render to the same text in
different ways are not confused, and a per-request cache salt keeps tenants apart as the
engine's own prefix cache does.

Each ingress replica routes with its own index; with several ingress replicas a prefix may
warm up to one model replica per ingress replica (Ray Serve LLM shares one index in an actor at
the price of a remote call on every request; not done here).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..batching.types import BatchRequest
from .prefix_index import PrefixIndex

__all__ = ["PrefixAwareRouter"]


class PrefixAwareRouter(RequestRouter):
    """Routes by the longest token-id prefix match, falling back to the least loaded replica."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Args (``request_router_kwargs`` of the deployment):
        block_size: tokens per indexed block (16, the engine's prefix-pool block).
        max_blocks_per_replica: blocks remembered per replica.
        min_match_tokens: shortest prefix worth routing for (one block).
        imbalance_threshold: most extra ongoing requests a warm replica may have over the
            least loaded one and still be preferred (16: half a default batch).
        """
        block_size = int(kwargs.pop("block_size", 16))
        max_blocks = int(kwargs.pop("max_blocks_per_replica", 8192))
        self.min_match_tokens = int(kwargs.pop("min_match_tokens", block_size))
        self.imbalance_threshold = int(kwargs.pop("imbalance_threshold", 16))
        if kwargs:
            raise TypeError(f"unknown PrefixAwareRouter settings: {sorted(kwargs)}")
        self.index: PrefixIndex[ReplicaID] = PrefixIndex(
            block_size=block_size, max_blocks_per_replica=max_blocks
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Replicas to try, best rank first."""
        if not candidate_replicas:
            return []
        names = self._block_names(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks = self.index.rank(
            names,
            {r.replica_id: self._load(r) for r in candidate_replicas},
            min_match_tokens=self.min_match_tokens,
            imbalance_threshold=self.imbalance_threshold,
        )
        if ranks is not None:
            return [[by_id[i] for i in rank] for rank in ranks]
        # Two at random (in random order: Serve takes the first of equally loaded ones).
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        """Remember that the request's prefix is now warm in ``replica_id``."""
        names = self._block_names(pending_request)
        if names:
            self.index.insert(replica_id, names)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica's prefixes: its replacement starts cold."""
        super().on_replica_actor_died(replica_id)
        self.index.remove(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Keep the index to the running replicas."""
        super().update_replicas(replicas)
        self.index.retain(r.replica_id for r in replicas)

    def _load(self, replica: RunningReplica) -> int:
        """Ongoing requests Serve last saw at ``replica`` (0 when not known yet)."""
        known = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if known is None else int(known)

    def _block_names(self, pending_request: PendingRequest | None) -> list[int]:
        """The block names of a generation request's prompt ([] for other calls)."""
        if pending_request is None or not pending_request.args:
            return []
        request = pending_request.args[0]
        if not isinstance(request, BatchRequest) or not isinstance(request.prompt, list):
            return []
        prompt = request.prompt
        if not all(isinstance(t, int) for t in prompt[: self.index.block_size]):
            return []
        return self.index.block_hashes(prompt, request.cache_salt)
