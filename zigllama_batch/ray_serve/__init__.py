"""Ray Serve integration: replicas that each own a BatchProcessor, behind Serve's HTTP proxy.

Install with ``pip install -e '.[ray]'`` from the repository, then::

    serve run zigllama_batch.ray_serve:build_app model=smollm2-135m num_replicas=2

Inside: :func:`build_app` and its :class:`RayAppArgs`; the deployments :class:`OpenAIIngress`
(the same OpenAI app as ``zigllama-batch serve``) and :class:`ModelReplica` (one processor per
replica); :class:`PrefixAwareRouter`, which sends a prompt to the replica holding its prefix;
:class:`RemoteProcessor`, the ingress's processor surface over the replicas.
"""

from __future__ import annotations

from .app import OpenAIIngress, RayAppArgs, build_app
from .prefix_index import PrefixIndex
from .remote import ModelInfo, RemoteProcessor, RemoteStream
from .replica import ModelReplica, ReplicaSettings
from .router import PrefixAwareRouter

__all__ = [
    "ModelInfo",
    "ModelReplica",
    "OpenAIIngress",
    "PrefixAwareRouter",
    "PrefixIndex",
    "RayAppArgs",
    "RemoteProcessor",
    "RemoteStream",
    "ReplicaSettings",
    "build_app",
]
