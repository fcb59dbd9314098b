"""Ray Serve: the funnel's app builder — retrieval → pre-ranking → ranking behind one ingress, with an A/B router.

- serving/ingress.py: the FastAPI ingress `Funnel` (/retrieve, /prerank, /rank, /recommend,
  /feedback, /flush, /healthz; validation, routing, the event log);
- serving/stages.py: the three stages (`RetrieverStage`, `PrerankerStage`, `RankerStage`), each a
  registry model held by alias and reloaded when the alias moves;
- here: `build_app`, the typed builder. With `serve.colocate` (the default; one machine) the
  stages live in the ingress replica and are awaited in-process; with `serve.colocate: false` (a
  cluster) each stage is a deployment of its own per alias the arms use, behind handles.

    serve run serving/config.yaml          # or: python -m jobs.e2e (deploy stage)
"""

from ray import serve

from serving.ingress import Funnel, arm_aliases
from serving.schemas import (  # noqa: F401 - re-exported: the contract is part of the app
    MAX_BODY_BYTES,
    Click,
    FeedbackRequest,
    FunnelArgs,
    Items,
    PrerankRequest,
    RankRequest,
    Recommendation,
    RecommendRequest,
    RetrieveRequest,
)
from serving.stages import STAGES


def build_app(args: FunnelArgs) -> serve.Application:
    """The typed app builder (`serve run serving/config.yaml` validates its `args:` as
    FunnelArgs): the ingress, with the stages in it (`serve.colocate`) or one stage deployment
    per alias the arms use. Relative paths are resolved here, where the command runs, not in
    the replicas."""
    import dataclasses
    from pathlib import Path

    from training.registry import resolve_tracking_uri

    args = args if isinstance(args, FunnelArgs) else FunnelArgs(**args)
    from serving.guard import read_token

    args = args.model_copy(update={
        "data_dir": str(Path(args.data_dir).resolve()), "tracking_uri": resolve_tracking_uri(args.tracking_uri),
        "serve": dataclasses.replace(args.serve, event_log=str(Path(args.serve.event_log).resolve()),
                                     token_file=str(Path(args.serve.token_file).resolve()))})
    read_token(args.serve.token_file)  # no token → a clear error here, not a replica that fails to start
    aliases = arm_aliases(args)  # a variant that is neither popularity nor funnel@<alias>: an error here
    if args.serve.ingress_replicas < 1:
        raise ValueError(f"serve.ingress_replicas must be at least 1, got {args.serve.ingress_replicas}")
    if args.serve.ingress_replicas > 1 and args.serve.state_backend == "local":
        raise ValueError(f"serve.ingress_replicas={args.serve.ingress_replicas} needs serve.state_backend: actor "
                         "or replicated (with per-replica state a /feedback click can reach a replica that never "
                         "served its slate)")
    if args.serve.state_backend == "replicated" and not args.serve.state_sync_ms > 0:
        raise ValueError(f"serve.state_sync_ms must be > 0 with state_backend replicated, got {args.serve.state_sync_ms}")
    opts = {"ray_actor_options": {"num_cpus": args.serve.replica_cpus, **replica_runtime_env(args.serve)},
            "logging_config": {"enable_access_log": args.serve.access_log},
            "max_ongoing_requests": args.serve.max_ongoing_requests}
    ingress = Funnel.options(num_replicas=args.serve.ingress_replicas, **opts)
    if args.serve.colocate:
        return ingress.bind(args)
    stages = {kind: {a: cls.options(name=f"{cls.name}-{a}", **opts).bind(args, a) for a in aliases}
              for kind, cls in STAGES.items()}
    return ingress.bind(args, stages)


def replica_runtime_env(serve_cfg) -> dict:
    """The replicas' runtime_env: Serve reads RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD when a
    replica process starts, so `serve.user_code_thread: false` reaches it as an env var of the
    replica's own (Ray merges a deployment's env_vars with the job's runtime_env). Likewise
    `serve.throughput_optimized` (Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED: request-path logs buffered, not
    echoed to stderr, handles over gRPC)."""
    env = {} if serve_cfg.user_code_thread else {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    if serve_cfg.throughput_optimized:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        env.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")  # the mode's own default is 0
    return {"runtime_env": {"env_vars": env}} if env else {}


def args_from_config(cfg, data_dir: str | None = None) -> FunnelArgs:
    """FunnelArgs from a FunnelConfig (the jobs' one typed config)."""
    from pathlib import Path

    from training.registry import setup_tracking

    setup_tracking(cfg.tracking)  # resolves a relative SQLite path the way training wrote it
    import mlflow

    return FunnelArgs(data_dir=str(Path(data_dir or cfg.data.output).resolve()), tracking_uri=mlflow.get_tracking_uri(),
                      serve=cfg.serve, abtest=cfg.abtest, max_ts=cfg.data.max_ts)
