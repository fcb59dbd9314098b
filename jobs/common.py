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


def serve_startup_env() -> None:
    """Serve settings that must be in the environment before Ray starts (workers inherit it):

    - Serve's HTTP proxy must report ready within 5 s by default; on a busy 2-core machine
      importing it takes longer and Serve kills and restarts it forever. Give it a minute.
    - Direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS`, a Ray Serve feature flag): the ingress
      replica serves HTTP on its own port (from 30000; `jobs.abtest.served_url` finds it), so a
      request skips the proxy and its actor call — 8.9 ms of CPU per /rank request on 2 cores
      (benchmarks/RESULTS.md, "Serving load"). The proxy still answers on serve.port. Its drain
      period at shutdown (30 s by default) is cut to 2 s: a redeploy need not wait for a load
      balancer to deregister. Export RAY_SERVE_ENABLE_DIRECT_INGRESS=0 to go through the proxy.
    """
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
