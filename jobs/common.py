"""What every job shares: config flags, Ray start-up inside the sandbox."""

from __future__ import annotations

import argparse
import os

from configs import FunnelConfig, load_config


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml", help="YAML config (configs/tiny|small|large.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set world.num_users=5000 (repeatable)")
    return p


def load(args: argparse.Namespace) -> FunnelConfig:
    return load_config(args.config, args.overrides)


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    ray_startup_env()
    serve_startup_env()
    # The dashboard (127.0.0.1:8265) also serves the State API that Ray Train's placement-group
    # cleaner polls; without it every fit logs a warning per second.
    kwargs: dict = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        if object_store_memory:
            kwargs["object_store_memory"] = object_store_memory
    ray.init(**kwargs)


def ray_startup_env() -> None:
    """Ray settings that must be in the environment before a local cluster starts.

    A raylet kills a worker idle for more than 1 s once more workers exist than its soft limit
    (the CPU count), and Ray Data keeps two 0-CPU actors alive (its stats and autoscaling
    actors), so on a small node every pause between two executions cost both task workers:
    the next stage started new processes that import pandas, pyarrow and the pipeline again.
    The ingest at 1M events spent 71 s instead of 33 s that way (benchmarks/RESULTS.md,
    "Ingest"). Idle workers now live 30 s. `ray_cluster.yaml` sets the same on every node.

    A local cluster also keeps one spill/restore I/O worker, not Ray's default of 4. When the input
    is larger than the object store, 2 spill and 4 restore workers of ~50 MB each are more
    processes than 2 cores can keep busy. With one, the bounded-memory ingest peaks ~270 MB lower
    in the same time (benchmarks/RESULTS.md, "Ingest"). A cluster node keeps Ray's default.
    """
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "30000")
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_max_io_workers", "1")


def serve_startup_env() -> None:
    """Serve settings that must be in the environment before Ray starts (workers inherit it):

    - Serve's HTTP proxy must report ready within 5 s by default; on a busy 2-core machine
      importing it takes longer and Serve kills and restarts it forever. Give it a minute.
    - Direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS`, a Ray Serve feature flag): the ingress
      replica serves HTTP on its own port (from 30000; `serving.deploy.served_url` finds it), so a
      request skips the proxy and its actor call — 8.9 ms of CPU per /rank request on 2 cores
      (benchmarks/RESULTS.md, "Serving load"). The proxy still answers on serve.port. Its drain
      period at shutdown (30 s by default) is cut to 2 s: a redeploy need not wait for a load
      balancer to deregister. Export RAY_SERVE_ENABLE_DIRECT_INGRESS=0 to go through the proxy.
    """
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
