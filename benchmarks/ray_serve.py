"""Ray Serve replicas against the standalone server, under 32 streaming clients.

The standalone server (``zigllama-batch serve``, CONTINUOUS, max batch 32, default model) and
a local Ray with Serve and ONE model replica (the same batching settings, all cores for its
BLAS threads) take turns under the same load of 32 closed-loop streaming clients: standalone,
Ray, standalone, Ray, ..., standalone. Ray is stopped after each of its runs, so its processes
never run during a standalone measurement. Each Ray run is divided by the mean of the
standalone runs either side of it, which cancels the machine's drift; the median of those
ratios answers "what does Serve cost". Then two replicas (one core each) under the same load,
reported as it is. Also reported: start-up to ready time, each replica's memory (RSS), and all
of Ray's processes' memory.

    python benchmarks/ray_serve.py [--rounds 3] [--requests-per-client 3] [--out benchmarks/results]

Writes ``ray_serve.json`` into ``--out``. Each load is preceded by a short warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

from zigllama_batch.ray_serve.local import LocalServe
from zigllama_batch.testing import ServerProcess, chat_stream_load, cpu_name

OUTPUT_TOKENS = 64
CLIENTS = 32
TOPICS = ["the sea", "a lighthouse", "bees", "a robot", "autumn", "the moon", "a library",
          "trains", "mountains", "coffee", "a garden", "winter"]  # fmt: skip
GiB = 1 << 30


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}."


async def measure(base: str, model: str, per_client: int, kind: str) -> dict[str, Any]:
    await chat_stream_load(base, model, 4, 1, 8, prompt)  # warm-up
    row = await chat_stream_load(base, model, CLIENTS, per_client, OUTPUT_TOKENS, prompt)
    row["kind"] = kind
    print(
        f"{kind:>16} N={CLIENTS}  {row['output_tokens_per_s']:7.1f} tok/s  latency p50/p99 "
        f"{row['latency_p50_ms']:6.0f}/{row['latency_p99_ms']:6.0f} ms  TTFT p50/p99 "
        f"{row['ttft_p50_ms']:5.0f}/{row['ttft_p99_ms']:5.0f} ms",
        flush=True,
    )
    return row


def ray_memory(exclude: int) -> dict[str, Any]:
    """RSS of this process's descendants (Ray's), by role; ``exclude`` is the standalone
    server's pid (its process is a child too)."""
    replicas, ingress, other = [], 0, 0
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid == exclude or exclude in [a.pid for a in p.parents()]:
                continue
            title = " ".join(p.cmdline())
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        if "ModelReplica" in title:
            replicas.append(rss)
        elif "OpenAIIngress" in title:
            ingress += rss
        else:
            other += rss
    return {
        "replica_rss_gib": [r / GiB for r in replicas],
        "ingress_rss_gib": ingress / GiB,
        "rest_of_ray_rss_gib": other / GiB,
    }


def serve_args(replicas: int, cpus: int) -> dict[str, Any]:
    return {
        "num_replicas": replicas,
        "cpus_per_replica": cpus,
        "strategy": "continuous",
        "max_batch_size": 32,
    }


async def on_ray(replicas: int, cpus: int, per_client: int, exclude: int) -> dict[str, Any]:
    with LocalServe(serve_args(replicas, cpus), num_cpus=os.cpu_count()) as local:
        print(f"  Ray + Serve + {replicas} replica(s) ready in {local.ready_s:.1f} s", flush=True)
        memory = ray_memory(exclude)
        row = await measure(local.base_url, local.model, per_client, f"ray x{replicas}")
    return {**row, "replicas": replicas, "ready_s": local.ready_s, **memory}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    per_client = args.requests_per_client
    server = ServerProcess("--max-batch-size", "32", capture_output=False).start()
    assert server.process is not None
    pid = server.process.pid
    standalone_rss = psutil.Process(pid).memory_info().rss / GiB
    rows: list[dict[str, Any]] = []
    ratios: list[float] = []
    try:
        before = await measure(server.base_url, server.model, per_client, "standalone")
        rows.append(before)
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            ray1 = await on_ray(1, cores, per_client, pid)
            after = await measure(server.base_url, server.model, per_client, "standalone")
            rows += [ray1, after]
            alone = (before["output_tokens_per_s"] + after["output_tokens_per_s"]) / 2
            ratios.append(ray1["output_tokens_per_s"] / alone)
            print(f"  ray x1 / standalone either side: {ratios[-1]:.1%}", flush=True)
            before = after
        two = await on_ray(2, max(1, cores // 2), per_client, pid)
        rows.append(two)
    finally:
        server.stop()

    def median_tps(kind: str) -> float:
        return float(statistics.median(r["output_tokens_per_s"] for r in rows if r["kind"] == kind))

    alone_tps = median_tps("standalone")
    share = statistics.median(ratios)
    ready = statistics.median(r["ready_s"] for r in rows if r["kind"].startswith("ray"))
    replica_rss = statistics.median(
        g for r in rows if "replica_rss_gib" in r for g in r["replica_rss_gib"]
    )
    print()
    print("| setup | output tokens/s at 32 streaming clients (median) | share of standalone |")
    print("|---|---|---|")
    print(f"| standalone server | {alone_tps:.1f} | 100% |")
    print(f"| Ray Serve, 1 replica x {cores} cores | {median_tps('ray x1'):.1f} | {share:.1%} |")
    print(
        f"| Ray Serve, 2 replicas x {max(1, cores // 2)} core(s) | "
        f"{two['output_tokens_per_s']:.1f} | {two['output_tokens_per_s'] / alone_tps:.1%} |"
    )
    print()
    print(
        "1 replica's share: median of each Ray run over the mean of the standalone runs either "
        "side: " + ", ".join(f"{v:.1%}" for v in ratios)
    )
    print(f"start-up to ready (ray.init + Serve + replicas loaded): median {ready:.1f} s")
    print(
        f"memory: standalone server {standalone_rss:.2f} GiB; each replica {replica_rss:.2f} GiB; "
        f"ingress {two['ingress_rss_gib']:.2f} GiB; rest of Ray {two['rest_of_ray_rss_gib']:.2f} GiB"
    )
    write(
        Path(args.out),
        {
            "machine": {"cpu": cpu_name(), "cores": cores, "python": platform.python_version()},
            "clients": CLIENTS,
            "output_tokens_per_request": OUTPUT_TOKENS,
            "max_batch_size": 32,
            "runs": rows,
            "ray_1_replica_over_standalone": share,
            "per_run_ratios": ratios,
            "standalone_tokens_per_s": alone_tps,
            "ray_1_replica_tokens_per_s": median_tps("ray x1"),
            "ray_2_replicas_tokens_per_s": two["output_tokens_per_s"],
            "ready_s_median": ready,
            "standalone_rss_gib": standalone_rss,
            "replica_rss_gib_median": replica_rss,
            "measured_at": time.strftime("%Y-%m-%d"),
        },
    )


def write(out: Path, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_serve.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'ray_serve.json'}")


if __name__ == "__main__":
    asyncio.run(main())
