"""One typed configuration object, from the command line to every stage.

`FunnelConfig` holds one dataclass per stage. It is loaded from YAML
(`configs/tiny.yaml`, `small.yaml`, `large.yaml`), overridden from the command
line with `--set section.key=value`, validated strictly (an unknown key or a
wrong type is an error naming the key), and logged to MLflow as flat params
(`flatten(asdict(cfg))`). Later stages add fields here, never `**kwargs`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.configs import (  # torch-free: a data worker loads this config without torch
    AdaF2M2Config,
    CDNetConfig,
    DCNv2Config,
    DINConfig,
    DLFConfig,
    KARMAConfig,
    LREAConfig,
    MeanPoolConfig,
    SIMHardConfig,
    TwoTowerConfig,
)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class WorldConfig:
    """The simulator's ground-truth world (pipeline/simulator.py).

    The same world generates the training logs and answers the simulated A/B
    test, so a model that learns it better wins the A/B.
    """

    seed: int = 7
    num_users: int = 300
    num_items: int = 500
    num_categories: int = 8
    brands_per_category: int = 4
    latent_dim: int = 16
    zipf_s: float = 1.1  # item popularity exponent
    new_item_frac: float = 0.3  # items that arrive after the log start (cold start)
    new_user_frac: float = 0.5  # users who register during the horizon
    log_days: int = 30  # the log horizon
    ab_days: int = 7  # the A/B horizon after it
    start_ts: int = 1_700_006_400  # 2023-11-15 00:00 UTC, the log start
    activity_alpha: float = 1.5  # Pareto (continuous Zipf) exponent of active days
    sessions_per_day: float = 1.0  # 1 + Poisson(this)
    requests_per_session: float = 2.0  # 1 + Poisson(this)
    slate_size: int = 10
    policy_popular: float = 0.4  # logging-policy slate mix; the rest is uniform
    policy_interest: float = 0.4
    base_logit: float = -4.5  # a0: sets the base CTR (~9% with the defaults)
    affinity_scale: float = 1.0  # gamma: how learnable the world is
    item_bias_scale: float = 0.5  # weight of the standardised log-Zipf item bias
    position_bias: float = 0.15  # logit drop per slate position
    noise_click_prob: float = 0.05  # epsilon: a request also yields a noise click
    short_stay_prob: float = 0.8  # short-term interest Markov chain
    short_epoch_hours: int = 4  # the chain steps once per epoch
    users_per_block: int = 2000  # generation unit; fixed so output is independent of parallelism


@dataclass
class DataConfig:
    """Ingest: readers, validation, vocabularies, splits, examples."""

    source: Literal["simulator", "movielens", "movielens1m", "taobao", "parquet"] = "simulator"
    input: str = ""  # path for file sources
    # served-traffic event logs (serve.event_log folders of events-*.parquet segments) ingested
    # together with the source's events: the closed loop's new training logs
    served_events: list[str] = field(default_factory=list)
    output: str = "data/processed/tiny"
    column_map: dict[str, str] = field(default_factory=dict)  # generic reader: canonical -> input column
    extra_event_kinds: list[str] = field(default_factory=lambda: ["buy", "cart", "fav"])
    require_item_metadata: bool = True
    max_ts: int = 0  # far-future cut-off; 0 = now + 1 day at run time
    min_ts: int = 0  # timestamps before this are out of range
    val_frac: float = 0.1  # of the time range, by time, never by rows
    test_frac: float = 0.1
    min_count: int = 1  # vocabulary: ids seen fewer times in train become OOV
    # an earlier ingest output whose keys and vocabulary ids this one keeps, appending new values
    # (pipeline/vocab.py): models trained on it still read their own ids (the closed loop sets it)
    vocab_from: str = ""
    long_len: int = 200
    short_len: int = 20
    title_len: int = 12
    max_hard_negatives: int = 8
    num_negatives: int = 4  # sampled per click when the log has no impressions
    negative_sampling: Literal["uniform", "popularity"] = "popularity"
    ctr_prior_strength: float = 20.0  # smoothing of past-only click-through rates
    num_partitions: int = 8  # partitions of the user and item shuffles (pipeline/shuffle.py)
    # a shuffle's reduce tasks, and the per-partition writes, in flight at once (0 = as many as the
    # CPUs run); 1 bounds a memory-bound ingest's peak (benchmarks/RESULTS.md, "Bounded memory")
    max_parallel_reduces: int = 0
    progress: bool = True


@dataclass
class ModelConfig:
    """Which model to train, and every model's own typed config as a section
    (`model.cdnet.topk_ratio`, `model.adaf2m2.alpha`, ...): validated like every other key,
    logged to MLflow with the rest of the config, and the one source `params_for` builds a
    model's params from — for the demo, jobs.train, Tune and the fidelity report alike."""

    name: str = "cdnet"
    preset: Literal["default", "tiny"] = "default"  # tiny: each model's smallest config (tests, the tiny world)
    mean_pool: MeanPoolConfig = field(default_factory=MeanPoolConfig)
    din: DINConfig = field(default_factory=DINConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    sim_hard: SIMHardConfig = field(default_factory=SIMHardConfig)
    cdnet: CDNetConfig = field(default_factory=CDNetConfig)
    dlf: DLFConfig = field(default_factory=DLFConfig)
    lrea: LREAConfig = field(default_factory=LREAConfig)
    adaf2m2: AdaF2M2Config = field(default_factory=AdaF2M2Config)
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    karma: KARMAConfig = field(default_factory=KARMAConfig)

    def section(self, name: str) -> dict[str, Any]:
        """One model's config as a dict: its section, or its tiny preset when `preset` is tiny."""
        sec = getattr(self, name, None) if name not in ("name", "preset") else None
        if not dataclasses.is_dataclass(sec):
            models = [f.name for f in dataclasses.fields(self) if f.name not in ("name", "preset")]
            raise ConfigError(f"model {name!r} has no config section; known: {', '.join(models)}")
        return dataclasses.asdict(type(sec).tiny() if self.preset == "tiny" else sec)

    def params_for(self, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full params of `name` for `models.build_model`: its section(s) with `overrides`
        (a JSON `--params`, a Tune trial's knobs) on top; "adaf2m2:<base>" gives
        {"base": <base's section>, "adaf2m2": <the adaf2m2 section>} (for the two-tower the
        AdaF2M2 knobs are fields of its own section). Unknown override keys stay in, so that
        `build_model` names them in its error."""
        o = dict(overrides or {})
        if not name.startswith("adaf2m2:"):
            return self.section(name) | o
        base = name.split(":", 1)[1]
        ada = {} if base == "two_tower" else self.section("adaf2m2")
        return {"base": self.section(base) | dict(o.pop("base", None) or {}),
                "adaf2m2": ada | dict(o.pop("adaf2m2", None) or {}), **o}


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_workers: int = 1
    cpus_per_worker: float = 1.0  # below 1 leaves room for Ray Data tasks (Tune trials on 2 cores)
    use_gpu: Literal["auto", "true", "false"] = "auto"
    seed: int = 0
    max_failures: int = 1
    patience: int = 2
    storage_path: str = "runs/ray"
    seq_len: int = 0  # behaviors fed to the models; 0 = data.long_len
    max_train_rows: int = 0  # a random sample of the train split per epoch budget; 0 = all rows
    max_val_rows: int = 0  # a fixed random sample of val (early stopping, curves); 0 = all rows
    max_test_rows: int = 0  # a fixed random sample of test; 0 = all. The registry gate reads test: keep 0
    retrieval_k: int = 50  # HR/NDCG/JS@K of retrieval models; early stopping on val HR@K
    retrieval_epochs: int = 0  # the most epochs of a retrieval fit (one row per click: far fewer rows); 0 = epochs
    new_user_max_clicks: int = 2  # AUC per state group: users with at most this many past clicks are "new"
    cold_item_max_clicks: int = 2  # items with at most this many past clicks are "cold"
    parallel_models: int = 1  # jobs.e2e: the funnel's models fitted side by side (1 = one after another)
    # splits whose parquet files total at most this many MiB are read once per fit (pyarrow, into Ray's
    # object store: training.loop.in_object_store), not re-read by a new Ray Data execution every epoch;
    # 0 = always stream
    materialize_max_mb: int = 512


@dataclass
class TuneConfig:
    num_samples: int = 4
    max_concurrent: int = 2  # lowered at run time to leave one CPU for Ray Data (tune/run.py)
    grace_period: int = 1
    epochs: int = 0  # per trial; 0 = train.epochs
    max_train_rows: int = 0  # per trial; 0 = train.max_train_rows
    max_eval_rows: int = 0  # per trial, val and test samples (the best trial is re-tested on all of test); 0 = all


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    retrieve_top_n: int = 500
    prerank_top_m: int = 100
    rank_top_k: int = 10
    replica_cpus: float = 0.25
    # the three stages in the ingress replica, awaited in-process (one machine: no handle hop, one
    # FeatureStore); false = one deployment per stage behind handles (a cluster: stages scale apart)
    colocate: bool = True
    # the registry alias /retrieve, /prerank and /rank serve (/recommend serves each arm's own);
    # "" = "champion" when an arm serves it, else the one alias the arms serve
    alias: str = ""
    retriever: str = "karma"  # registered models of the funnel's stages (funnel-<name>)
    preranker: str = "lrea"
    ranker: str = "cdnet"
    index_factory: str = "Flat"  # FAISS factory string: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32, ...
    popular_n: int = 100  # the popularity recall channel beside FAISS
    retrieval_weight: float = 0.0  # pre-ranking score = LREA logit + this * retrieval score
    # LREA pre-ranking: a user with fewer behaviors than the rank is scored by eq. 5 over them (exact,
    # and cheaper); false = eq. 9's absorbed cache for every user (models.lrea.LREA.absorb)
    lrea_short_exact: bool = True
    # the funnel's ranking order = ranker logit + this * pre-rank score (0 = the ranker alone; /rank,
    # which gets no pre-rank scores, always ranks by the ranker alone)
    prerank_weight: float = 0.0
    reload_s: float = 30.0  # how often a stage checks whether its registry alias moved
    max_batch_size: int = 16  # @serve.batch: concurrent requests per forward pass (retriever, ranker); 1 = off
    batch_wait_ms: float = 2.0  # how long a batch waits to fill
    max_ongoing_requests: int = 32  # per replica (Serve's default, 5, also caps every @serve.batch at 5)
    event_log: str = "runs/served_events"
    # the event log is written as a segment when this many rows wait or this often (a crash loses
    # at most one window), and at replica shutdown (serving.router.EventLog)
    event_log_max_rows: int = 20_000
    event_log_flush_s: float = 2.0
    access_log: bool = False  # Serve's log line per request, in every replica and echoed by the driver
    # the bearer token of /feedback and /flush (of every endpoint with auth_all): FUNNEL_API_TOKEN
    # in the environment, else this file (the deploying jobs create it, random, mode 0600)
    token_file: str = "runs/serve_token"
    auth_all: bool = False
    served_requests: int = 100_000  # request ids the ingress remembers for /feedback (LRU; ~1 KB each)
    # the online feature state (pipeline/state.py) and the served-request registry: "local" = each
    # replica its own (one ingress replica, the default); "actor" = one named Ray actor every ingress
    # and stage replica reads and updates; "replicated" = a copy in every replica, read in-process, whose
    # writes the replicas exchange through one named actor every state_sync_ms (serving/state_store.py)
    state_backend: Literal["local", "actor", "replicated"] = "local"
    state_actor: str = "funnel-state"  # the actor's name (namespace "funnel") with state_backend "actor" or "replicated"
    state_sync_ms: float = 20.0  # "replicated": how often a replica sends its writes and applies the others'
    state_log_max_events: int = 2_000_000  # "replicated": the writes the actor keeps for a replica that starts
    ingress_replicas: int = 1  # more than 1 needs state_backend "actor" or "replicated" (a click must find its slate)
    # after start-up, freeze the replica's heap out of the cyclic collector (serving/pauses.py): a full
    # collection otherwise walks ~350k imported objects, a ~330 ms stop for every request behind it
    gc_freeze: bool = True
    # where the replica runs the funnel's code: false (ours) = on the loop that serves direct-ingress
    # HTTP (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the replicas' environment, what Serve's
    # RAY_SERVE_THROUGHPUT_OPTIMIZED mode sets); true = Serve's default, an event loop on a thread of its
    # own, so every request crosses between two threads that share the GIL. /rank at 100 QPS: p99 30-38 ms
    # against 57-3,382 (benchmarks/RESULTS.md, "Serving load", 2026-12-04)
    user_code_thread: bool = False
    # Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode in the replicas (request-path logs buffered and not echoed
    # to stderr, handles over gRPC); user_code_thread still decides the loop
    throughput_optimized: bool = False


@dataclass
class ABTestConfig:
    num_users: int = 500
    requests_per_user: int = 4  # per simulated user, in sessions like the log's (see abtest/traffic.py)
    salt: str = "funnel-ab"
    arms: dict[str, int] = field(default_factory=lambda: {"control": 50, "treatment": 50})
    # what each arm serves: "popularity" or "funnel@<registry alias>"
    variants: dict[str, str] = field(default_factory=lambda: {"control": "popularity",
                                                              "treatment": "funnel@challenger"})
    alpha: float = 0.05
    slate_size: int = 10
    concurrency: int = 8  # simulated users in flight
    cuped: bool = True  # promotion reads the CUPED-adjusted lift (covariate: each user's pre-test CTR in the logs)
    seed: int = 0


@dataclass
class TrackingConfig:
    """MLflow: a SQLite file and a local artifact folder unless configured."""

    uri: str = "sqlite:///runs/mlflow.db"
    artifact_location: str = "runs/mlartifacts"
    experiment: str = "funnel"


@dataclass
class FunnelConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    abtest: ABTestConfig = field(default_factory=ABTestConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- strict conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` against the annotation `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_convert(k, k_tp, f"{key}.<key>"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # a schema bug, not user input


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; known: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("column_map", "arms"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` → {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: cannot parse value {raw!r}: {e}") from e
    node: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        node = {p: node}
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FunnelConfig:
    """Load a YAML config (or the defaults), apply `--set` overrides, validate strictly."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    for o in overrides or []:
        data = _merge(data, parse_override(o))
    return _from_dict(FunnelConfig, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"section.key": value}, the form logged as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
