"""LocalServe: the Serve application on a Ray instance of this machine, for the command line,
tests and benchmarks.

Inside: :class:`LocalServe`. It starts Ray (or joins the cluster ``RAY_ADDRESS`` names), starts
Serve's HTTP proxy on ``host:port``, deploys :func:`~zigllama_batch.ray_serve.build_app` and
waits until every replica is ready; a Ray it starts polls less often than Serve's default
(:data:`SMALL_MACHINE_SERVE`). It reads each replica's metrics from Ray's Prometheus
export, and can kill a replica (as a crash would). Leaving it shuts Serve down (replicas drain)
and, if it started Ray, stops Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from ..server.run import API_KEY_ENV
from .app import RayAppArgs, build_app

__all__ = ["SMALL_MACHINE_SERVE", "LocalServe"]

SMALL_MACHINE_SERVE = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
"""Serve settings for a Ray that LocalServe starts (a variable already set wins). Serve's
controller polls every 0.1 s by default; on a 2-core machine that polling and the GCS calls it
makes took 0.03 of the 0.13 cores Ray uses when idle, taken from the model's BLAS threads.
Every 0.5 s, a replica's death or a scaling decision is noticed up to 0.4 s later."""


class LocalServe:
    """The Serve application on this machine's Ray (``with LocalServe(args) as local:``)."""

    def __init__(
        self,
        args: RayAppArgs | dict[str, Any],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        num_cpus: int | None = None,
        app_name: str = "zigllama",
        metrics_report_ms: int | None = None,
    ) -> None:
        """Args:
        args: the application's arguments.
        host, port: where Serve's proxy listens (default port: a free one).
        num_cpus: CPUs of a Ray started here (default: all of them).
        app_name: the Serve application's name.
        metrics_report_ms: how often processes report metrics to Ray's export (None: Ray's
            default, 10 s; tests that read metrics set 500).
        """
        self.args = args if isinstance(args, RayAppArgs) else RayAppArgs.model_validate(args)
        self.host = host
        self.port = port or _free_port()
        self.num_cpus = num_cpus
        self.app_name = app_name
        self.metrics_report_ms = metrics_report_ms
        self.metrics_port: int | None = None
        self.model = ""
        self.ready_s = 0.0
        self._started_ray = False

    @property
    def base_url(self) -> str:
        """Where Serve's proxy answers."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Start Ray if needed, then Serve, and deploy; returns once every replica is ready."""
        began = time.perf_counter()
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                self.metrics_port = _free_port()
                with _environment(SMALL_MACHINE_SERVE):
                    ray.init(
                        num_cpus=self.num_cpus,
                        include_dashboard=False,
                        log_to_driver=False,
                        _metrics_export_port=self.metrics_port,
                        _system_config=(
                            {"metrics_report_interval_ms": self.metrics_report_ms}
                            if self.metrics_report_ms
                            else None
                        ),
                    )
                self._started_ray = True
        serve.start(http_options={"host": self.host, "port": self.port})
        serve.run(build_app(self.args), name=self.app_name, route_prefix="/")
        self.ready_s = time.perf_counter() - began
        key = self.args.api_key or os.environ.get(API_KEY_ENV)
        request = urllib.request.Request(
            f"{self.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # works inside a loop too
            self.model = json.load(response)["data"][0]["id"]
        return self

    def stop(self) -> None:
        """Shut Serve down (replicas drain), and Ray if this started it. Idempotent."""
        if ray.is_initialized():
            serve.shutdown()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
            if self._started_ray:
                ray.shutdown()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def replica_metrics(self) -> dict[str, dict[str, float]]:
        """Each model replica's ``zigllama_*`` series, by replica id: counters by name (with
        ``:outcome`` for requests), gauges by name, histograms' ``_count`` and ``_sum``."""
        if self.metrics_port is None:
            raise RuntimeError("metrics are read from a Ray this LocalServe started")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        found: dict[str, dict[str, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if not sample.name.startswith("ray_zigllama_"):
                    continue
                if labels.get("application") != self.app_name:
                    continue
                name = sample.name.removeprefix("ray_")
                if "outcome" in labels:
                    name += f":{labels['outcome']}"
                elif "le" in labels:
                    continue  # histogram buckets: _count and _sum are enough here
                found[labels["replica"]][name] = sample.value
        return dict(found)

    def replica_ids(self) -> list[str]:
        """Ids of the model replicas Serve has running."""
        names = ray.util.list_named_actors(all_namespaces=True)
        prefix = f"SERVE_REPLICA::{self.app_name}#ModelReplica#"
        return sorted(a["name"].removeprefix(prefix) for a in names if a["name"].startswith(prefix))

    def kill_replica(self, replica_id: str) -> None:
        """Kill a model replica's process at once, as a crash would (Serve replaces it)."""
        name = f"SERVE_REPLICA::{self.app_name}#ModelReplica#{replica_id}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def running_replicas(self) -> int:
        """Model replicas Serve reports RUNNING."""
        status = serve.status().applications[self.app_name].deployments["ModelReplica"]
        return sum(n for state, n in status.replica_states.items() if state == "RUNNING")


@contextlib.contextmanager
def _environment(defaults: dict[str, str]) -> Iterator[None]:
    """Environment variables for the processes Ray starts to inherit (those not set already),
    restored afterwards."""
    added = {name: value for name, value in defaults.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
