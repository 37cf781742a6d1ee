"""build_app: the deployments, options and layout it builds from its arguments, and the Serve
config file docs/ray.md shows (no Ray instance needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from zigllama_batch.ray_serve import ModelReplica, OpenAIIngress, build_app
from zigllama_batch.ray_serve.replica import ReplicaSettings

RAY_DOC = Path(__file__).parents[2] / "docs" / "ray.md"


def deployments(args: dict[str, Any]) -> dict[str, Any]:
    """The application's deployments by name (the ingress binds the model deployment)."""
    app = build_app(args)
    top = app._bound_deployment
    found = {top.name: top}
    for arg in top.init_args:
        bound = getattr(arg, "_bound_deployment", None)
        if bound is not None:
            found[bound.name] = bound
    return found


def test_several_replicas_get_an_ingress_and_the_prefix_router() -> None:
    """Two replicas: the ingress (no CPU reserved) in front of replicas routed by prefix,
    whose backpressure bounds come from the batching config."""
    found = deployments(
        {"num_replicas": 2, "cpus_per_replica": 2, "max_batch_size": 16, "max_queue_size": 100}
    )
    assert set(found) == {"OpenAIIngress", "ModelReplica"}
    ingress, model = found["OpenAIIngress"], found["ModelReplica"]
    assert issubclass(ingress.func_or_class, OpenAIIngress)
    assert ingress.ray_actor_options["num_cpus"] == 0
    assert model.func_or_class is ModelReplica
    assert model.num_replicas == 2
    assert model.ray_actor_options["num_cpus"] == 2
    assert model.max_ongoing_requests == 16 + 100  # a full batch plus the processor's queue
    assert model.max_queued_requests == 100
    router = model._deployment_config.request_router_config
    assert router.request_router_class.endswith("ray_serve.router.PrefixAwareRouter")
    assert router.request_router_kwargs == {"imbalance_threshold": 8}
    (settings,) = model.init_args
    assert isinstance(settings, ReplicaSettings)
    assert settings.threads == 2


@pytest.mark.parametrize(
    "args", [{"num_replicas": 1}, {"num_replicas": 3, "prefix_routing": False}]
)
def test_without_prefix_routing_each_replica_serves_http_itself(args: dict[str, Any]) -> None:
    """One replica, or routing by load alone: one deployment, no ingress hop."""
    found = deployments(args)
    assert set(found) == {"ModelReplica"}
    assert issubclass(found["ModelReplica"].func_or_class, ModelReplica)


def test_auto_scales_on_ongoing_requests_per_full_batch() -> None:
    """num_replicas=auto scales between the bounds, targeting one full batch per replica."""
    model = deployments({"num_replicas": "auto", "max_replicas": 6, "max_batch_size": 24})[
        "ModelReplica"
    ]
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 6)
    assert scaling.target_ongoing_requests == 24


@pytest.mark.parametrize(
    "args",
    [{"num_replica": 2}, {"max_batch_size": 0}, {"strategy": "fastest"}, {"num_replicas": "many"}],
)
def test_bad_arguments_are_refused_by_name(args: dict[str, Any]) -> None:
    """An unknown or out-of-range argument is a validation error naming it."""
    with pytest.raises(pydantic.ValidationError, match=next(iter(args))):
        build_app(args)


def test_the_documented_serve_config_is_valid() -> None:
    """The Serve config file in docs/ray.md passes Serve's schema and builds."""
    text = RAY_DOC.read_text()
    (block,) = re.findall(r"```yaml\n(# config\.yaml.*?)```", text, re.S)
    config = yaml.safe_load(block)
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "zigllama_batch.ray_serve:build_app"
    assert set(deployments(application["args"])) == {"OpenAIIngress", "ModelReplica"}
