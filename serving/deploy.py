"""Deploy the funnel on Ray Serve and find where it answers (the e2e job, the A/B, the loop, the
load benchmark)."""

from __future__ import annotations

import os

from configs import FunnelConfig


def deploy(cfg: FunnelConfig, data_dir: str | None = None) -> str:
    """Start Serve on 127.0.0.1 (by default) and deploy the funnel; returns its URL."""
    from ray import serve

    from serving.app import args_from_config, build_app
    from serving.guard import TOKEN_ENV, ensure_token_file

    if not os.environ.get(TOKEN_ENV):
        ensure_token_file(cfg.serve.token_file)  # a random token, mode 0600, if there is none yet
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(args_from_config(cfg, data_dir)), name="funnel", route_prefix="/")
    return served_url(cfg)


def served_url(cfg: FunnelConfig, via: str = "direct") -> str:
    """The first of `served_urls`."""
    return served_urls(cfg, via)[0]


def served_urls(cfg: FunnelConfig, via: str = "direct") -> list[str]:
    """Where the funnel answers: with Serve's direct ingress on (jobs.common.serve_startup_env), each
    ingress replica's own port (a balancer in front spreads the requests over them); else (or
    `via="proxy"`) the proxy on serve.host:serve.port. The replicas' ports come from the Serve
    controller's target groups (what a load balancer in front of direct-ingress replicas reads;
    Ray has no public call for it yet)."""
    proxy = [f"http://{cfg.serve.host}:{cfg.serve.port}"]
    if via == "proxy":
        return proxy
    try:
        import ray
        from ray.serve.context import _get_global_client

        groups = ray.get(_get_global_client()._controller.get_target_groups.remote("funnel"), timeout=30)
        ports = [t.port for g in groups if g.protocol.value == "HTTP" for t in g.targets]
    except Exception as e:  # an older Ray or no controller: the proxy
        print(f"[deploy] no direct-ingress target ({type(e).__name__}: {e}); using the proxy", flush=True)
        return proxy
    return [f"http://{cfg.serve.host}:{p}" for p in sorted(set(ports))] or proxy
