"""Ray Serve: /retrieve, /prerank, /rank, /recommend (+ /feedback, /flush, /healthz), an A/B router.

Deployments: one per stage (`RetrieverStage`, `PrerankerStage`, `RankerStage`) per registry
alias an arm uses, and the FastAPI ingress `Funnel` that validates requests (pydantic; a
bad request is a 4xx with the reason, never a 5xx: serving/guard.py), routes each user to an arm by a sticky
hash bucket, composes the stages through deployment handles, and logs every exposure (with
the model versions that served it) and every click in the canonical events format
(serving/router.py). `/feedback` and `/flush` take a bearer token (every endpoint with
`serve.auth_all`); a click is accepted only for a request this funnel served, once per
(request id, position), under the server's own record of the arm.

Models load from the MLflow registry by alias (`models:/funnel-<model>@<alias>`); each
stage checks the alias every `reload_s` seconds and, when it moved, loads the new version
beside the old one and swaps — requests in flight finish on the old model, none is dropped.

    serve run serving/config.yaml          # or: python -m jobs.e2e (deploy stage)
"""


import asyncio
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from serving.guard import BodyGuard, validation_error_body
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

# --------------------------------------------------------------------------- helpers
# (defined before the deployments: Serve ships the classes to replicas by value)


def _user(store, user_id: str, history: list[str] | None, recent: list[str] | None = None) -> tuple[int, np.ndarray]:
    """The user's key (0 = unknown: the cold-start path) and history as item keys: the request's
    own history if it sends one, else the log's followed by the clicks fed back since."""
    u = int(store.user_keys([user_id])[0])
    return u, store.user_history(u, _known(store, history), recent=_known(store, recent))


def _user_ts(store, user_id: str, history: list[str] | None, recent: list[tuple[int, str]] | None = None
             ) -> tuple[int, np.ndarray, np.ndarray]:
    """`_user` plus each history entry's click time (for the behaviors' age); `recent` as
    (ts, item id) pairs. Unknown items are dropped with their times."""
    u = int(store.user_keys([user_id])[0])
    keys = ts = None
    if recent:
        k = store.item_keys([i for _, i in recent])
        keys, ts = k[k > 0], np.array([t for t, _ in recent], dtype=np.int64)[k > 0]
    hist, hist_ts = store.user_history_ts(u, _known(store, history), recent=keys, recent_ts=ts)
    return u, hist, hist_ts


def _known(store, history: list[str] | None) -> np.ndarray | None:
    """The request's history as item keys; unknown items are dropped (cold start), None = use the log's."""
    if history is None:
        return None
    keys = store.item_keys(history)
    return keys[keys > 0]


def _positions(keys: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Indices into the request's candidates of the chosen keys, in chosen order (first match wins)."""
    order = {}
    for i, k in enumerate(keys.tolist()):
        order.setdefault(k, []).append(i)
    return np.array([order[k].pop(0) for k in chosen.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------- stages


class _Registered:
    """A model held by alias: load, and reload when the alias points elsewhere."""

    def __init__(self, args: FunnelArgs, model: str, alias: str):
        import mlflow

        from training.registry import registered_name

        mlflow.set_tracking_uri(args.tracking_uri)
        self.args, self.alias = args, alias
        self.name = registered_name(model)
        self.version = ""
        self._load()
        self._task = None

    def _resolve(self) -> str:
        import mlflow

        return str(mlflow.MlflowClient().get_model_version_by_alias(self.name, self.alias).version)

    def _load(self) -> None:
        import mlflow

        from training.registry import load_model

        version = self._resolve()
        model = load_model(f"models:/{self.name}/{version}")
        self.run_id = mlflow.MlflowClient().get_model_version(self.name, version).run_id
        self.pending_version = version
        self.build(model)  # the stage object is swapped whole: readers see old or new, never half
        self.version = version

    def build(self, model) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.args.serve.reload_s)
            try:
                if self._resolve() != self.version:
                    await asyncio.get_running_loop().run_in_executor(None, self._load)
            except Exception as e:  # a registry hiccup must not kill serving
                print(f"[serve] {self.name}@{self.alias}: reload check failed: {e}", flush=True)

    def ensure_watch(self) -> None:
        if self._task is None and self.args.serve.reload_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def check_reload(self) -> bool:
        """Reload now if the alias moved (tests; the watcher does it on a timer)."""
        if self._resolve() != self.version:
            self._load()
            return True
        return False


def _batching(method, args: FunnelArgs) -> None:
    s = args.serve
    method.set_max_batch_size(max(1, s.max_batch_size))
    method.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0 if s.max_batch_size > 1 else 0.0)


def _store(args: FunnelArgs):
    from serving.features import FeatureStore

    return FeatureStore(args.data_dir)


@serve.deployment
class RetrieverStage(_Registered):
    def __init__(self, args: FunnelArgs, alias: str):
        self.store = _store(args)
        super().__init__(args, args.serve.retriever, alias)
        _batching(self._retrieve_batch, args)

    def build(self, model) -> None:
        from serving.funnel import Retriever
        from serving.index_build import index_for_version

        index = index_for_version(model, self.run_id, self.pending_version, self.args.data_dir,
                                  self.args.serve.index_factory)
        self.stage = Retriever(model, index, self.store, self.args.serve.popular_n)

    async def retrieve(self, user_id: str, history: list[str] | None, n: int,
                       recent: list[str] | None = None) -> Items:
        self.ensure_watch()
        u, hist = _user(self.store, user_id, history, recent)
        res, version = await self._retrieve_batch((u, hist, n))
        return Items(items=self.store.item_ids(res.keys), scores=res.scores.tolist(), model_version=version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _retrieve_batch(self, reqs: list[tuple[int, np.ndarray, int]]) -> list[tuple[Any, str]]:
        """Concurrent requests → one user-tower forward and one FAISS search per distinct n."""
        stage, version = self.stage, self.version
        out: list[Any] = [None] * len(reqs)
        for n in {r[2] for r in reqs}:
            idx = [i for i, r in enumerate(reqs) if r[2] == n]
            for i, res in zip(idx, stage.retrieve_many([reqs[i][0] for i in idx], [reqs[i][1] for i in idx], n),
                              strict=True):
                out[i] = (res, version)
        return out


@serve.deployment
class PrerankerStage(_Registered):
    def __init__(self, args: FunnelArgs, alias: str):
        self.store = _store(args)
        super().__init__(args, args.serve.preranker, alias)

    def build(self, model) -> None:
        from serving.funnel import Preranker

        self.stage = Preranker(model, self.store, self.args.serve.retrieval_weight)

    async def prerank(self, user_id: str, history: list[str] | None, candidates: list[str],
                      scores: list[float] | None, m: int, ts: int, recent: list[str] | None = None) -> Items:
        from serving.funnel import Scored

        self.ensure_watch()
        stage = self.stage
        u, hist = _user(self.store, user_id, history, recent)
        keys = self.store.item_keys(candidates)
        s = np.asarray(scores if scores is not None else np.zeros(len(keys)), dtype=np.float32)
        res = stage.prerank(u, hist, Scored(keys, s), m, ts)
        return Items(items=list(np.asarray(candidates)[_positions(keys, res.keys)]), scores=res.scores.tolist(),
                     model_version=self.version)


@serve.deployment
class RankerStage(_Registered):
    def __init__(self, args: FunnelArgs, alias: str):
        self.store = _store(args)
        super().__init__(args, args.serve.ranker, alias)
        _batching(self._rank_batch, args)

    def build(self, model) -> None:
        from serving.funnel import Ranker

        self.stage = Ranker(model, self.store)

    async def rank(self, user_id: str, history: list[str] | None, candidates: list[str], k: int, ts: int,
                   recent: list[tuple[int, str]] | None = None) -> Items:
        """`recent`: the clicks fed back before ts as (ts, item id) pairs (their age is a ranking input)."""
        self.ensure_watch()
        u, hist, hist_ts = _user_ts(self.store, user_id, history, recent)
        keys = self.store.item_keys(candidates)
        res, version = await self._rank_batch((u, hist, keys, k, ts, hist_ts))
        return Items(items=list(np.asarray(candidates)[_positions(keys, res.keys)]), scores=res.scores.tolist(),
                     model_version=version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, reqs: list[tuple]) -> list[tuple[Any, str]]:
        """Concurrent requests → one forward pass over all their candidates."""
        stage, version = self.stage, self.version
        return [(res, version) for res in stage.rank_many(reqs)]

    def reload_now(self) -> str:
        self.check_reload()
        return self.version


# --------------------------------------------------------------------------- ingress

api = FastAPI(title="Funnel", description="retrieval → pre-ranking → ranking, with an A/B router")
api.add_middleware(BodyGuard, max_bytes=MAX_BODY_BYTES)


@api.exception_handler(RequestValidationError)
async def _invalid(request, exc: RequestValidationError) -> JSONResponse:
    """422 with the reasons, rendered safely whatever the input held."""
    return JSONResponse(validation_error_body(exc.errors()), status_code=422)


def _versions(args: FunnelArgs, stages: dict[str, str]) -> str:
    """"funnel-karma/3,funnel-lrea/2,funnel-cdnet/5": the models that served a slate."""
    from training.registry import registered_name

    s = args.serve
    return ",".join(f"{registered_name(m)}/{stages.get(k, '?')}"
                    for k, m in (("retriever", s.retriever), ("preranker", s.preranker), ("ranker", s.ranker)))


@serve.deployment
@serve.ingress(api)
class Funnel:
    def __init__(self, args: FunnelArgs, retrievers: dict[str, Any], prerankers: dict[str, Any],
                 rankers: dict[str, Any]):
        from serving.features import FeatureStore
        from serving.guard import read_token
        from serving.router import ArmRouter, EventLog, RecentClicks, ServedRequests

        self.args = args
        self.token = read_token(args.serve.token_file)
        self.router = ArmRouter(args.abtest.arms, args.abtest.salt)
        self.retrievers, self.prerankers, self.rankers = retrievers, prerankers, rankers
        self.default = next(iter(rankers))
        self.log = EventLog(args.serve.event_log)
        self.served = ServedRequests(args.serve.served_requests)
        self.recent = RecentClicks()  # /feedback clicks: the fresh end of each user's history
        store = FeatureStore(args.data_dir)
        self.popular = store.item_ids(store.popular[:100])  # the popularity arm's slate

    def _auth(self, authorization: str | None, required: bool = False) -> None:
        """401 unless the bearer token matches (always for /feedback and /flush; for every
        endpoint with serve.auth_all)."""
        from serving.guard import token_matches

        if (required or self.args.serve.auth_all) and not token_matches(self.token, authorization):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def _ts(self, ts: int | None) -> int:
        """The request's time (now if not sent), within the data's cut-off (422 beyond it)."""
        limit = self.args.max_ts or int(time.time()) + 86_400
        if ts is not None and ts > limit:
            raise HTTPException(422, f"ts {ts} is after the data's cut-off {limit} (data.max_ts)")
        return int(ts if ts is not None else time.time())

    @api.get("/healthz")
    def healthz(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        self._auth(authorization)
        return {"ok": True, "arms": self.args.abtest.arms, "variants": self.args.abtest.variants}

    def _recent(self, req, ts: int) -> list[str] | None:
        """Clicks fed back before `ts`, unless the request sends its own history."""
        return self.recent.before(req.user_id, ts) if req.history is None else None

    def _recent_ts(self, req, ts: int) -> list[tuple[int, str]] | None:
        """The same clicks as (ts, item id) pairs."""
        return self.recent.before_with_ts(req.user_id, ts) if req.history is None else None

    @api.post("/retrieve")
    async def retrieve(self, req: RetrieveRequest, authorization: str | None = Header(None)) -> Items:
        self._auth(authorization)
        recent = self._recent(req, self._ts(None))
        return await self.retrievers[self.default].retrieve.remote(req.user_id, req.history, req.n, recent)

    @api.post("/prerank")
    async def prerank(self, req: PrerankRequest, authorization: str | None = Header(None)) -> Items:
        self._auth(authorization)
        ts = self._ts(req.ts)
        return await self.prerankers[self.default].prerank.remote(req.user_id, req.history, req.candidates, None,
                                                                   req.m, ts, self._recent(req, ts))

    @api.post("/rank")
    async def rank(self, req: RankRequest, authorization: str | None = Header(None)) -> Items:
        self._auth(authorization)
        ts = self._ts(req.ts)
        return await self.rankers[self.default].rank.remote(req.user_id, req.history, req.candidates, req.k,
                                                             ts, self._recent_ts(req, ts))

    async def _funnel(self, alias: str, req: RecommendRequest, ts: int) -> tuple[Items, dict[str, str]]:
        a, recent = self.args.serve, self._recent(req, ts)
        got = await self.retrievers[alias].retrieve.remote(req.user_id, req.history, a.retrieve_top_n, recent)
        pre = await self.prerankers[alias].prerank.remote(req.user_id, req.history, got.items, got.scores,
                                                           a.prerank_top_m, ts, recent)
        out = await self.rankers[alias].rank.remote(req.user_id, req.history, pre.items, req.k, ts,
                                                     self._recent_ts(req, ts))
        return out, {"retriever": got.model_version, "preranker": pre.model_version, "ranker": out.model_version}

    @api.post("/recommend")
    async def recommend(self, req: RecommendRequest, authorization: str | None = Header(None)) -> Recommendation:
        from serving.router import Served

        self._auth(authorization)
        ts = self._ts(req.ts)
        arm = self.router.arm(req.user_id)
        variant = self.args.abtest.variants.get(arm, "popularity")
        rid = uuid.uuid4().hex
        if variant == "popularity":
            items, scores, stages, versions = self.popular[: req.k], list(np.linspace(1, 0.5, req.k)), {}, ""
        else:
            res, stages = await self._funnel(variant.split("@", 1)[1], req, ts)
            items, scores, versions = res.items, res.scores, _versions(self.args, stages)
        self.served.add(rid, Served(req.user_id, arm, items, versions, ts))
        self.log.exposures(req.user_id, items, ts, rid, arm, versions)
        return Recommendation(items=items, scores=scores, request_id=rid, arm=arm, stages=stages)

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Clicks on a slate this funnel served: checked against what it showed, logged with the
        server's own arm and model versions, each (request id, position) once."""
        self._auth(authorization, required=True)
        ts = self._ts(req.ts)
        got = self.served.get(req.request_id)
        if got is None:
            raise HTTPException(404, f"request_id {req.request_id[:64]!r} was not served by this funnel "
                                     f"(or is older than the last {self.args.serve.served_requests} requests)")
        if got.user_id != req.user_id:
            raise HTTPException(409, f"request_id {req.request_id[:64]!r} was served to another user")
        if ts < got.ts:
            raise HTTPException(422, f"click ts {ts} is before the slate was served ({got.ts})")
        clicks = req.all_clicks()
        for c in clicks:
            if c.position >= len(got.items) or got.items[c.position] != c.item_id:
                shown = got.items[c.position] if c.position < len(got.items) else None
                raise HTTPException(422, f"position {c.position} of request {req.request_id[:64]!r} showed "
                                         f"{shown!r}, not {c.item_id[:64]!r}")
        new = self.served.claim(got, [c.position for c in clicks])
        for p in new:
            self.log.click(req.user_id, got.items[p], ts, req.request_id, p, got.arm, got.versions)
            self.recent.add(req.user_id, got.items[p], ts)
        return {"ok": True, "clicks": len(new), "duplicates": len(clicks) - len(new)}

    @api.post("/flush")
    def flush(self, authorization: str | None = Header(None)) -> dict[str, str]:
        self._auth(authorization, required=True)
        path = self.log.flush()
        return {"written": str(path or "")}


def build_app(args: FunnelArgs) -> serve.Application:
    """The typed app builder (`serve run serving/config.yaml` validates its `args:` as
    FunnelArgs): one stage deployment per alias the arms use, and the ingress. Relative
    paths are resolved here, where the command runs, not in the replicas."""
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
    variants, arms = args.abtest.variants, args.abtest.arms
    aliases = sorted({v.split("@", 1)[1] for v in variants.values() if v.startswith("funnel@")}) or ["champion"]
    bad = [v for v in variants.values() if v != "popularity" and not v.startswith("funnel@")]
    if bad or set(variants) != set(arms):
        raise ValueError(f"abtest.variants must name every arm as 'popularity' or 'funnel@<alias>': {variants}")
    opts = {"ray_actor_options": {"num_cpus": args.serve.replica_cpus},
            "logging_config": {"enable_access_log": args.serve.access_log},
            "max_ongoing_requests": args.serve.max_ongoing_requests}
    stages = {kind: {a: cls.options(name=f"{cls.name}-{a}", **opts).bind(args, a) for a in aliases}
              for kind, cls in (("r", RetrieverStage), ("p", PrerankerStage), ("k", RankerStage))}
    return Funnel.options(**opts).bind(args, stages["r"], stages["p"], stages["k"])


def args_from_config(cfg, data_dir: str | None = None) -> FunnelArgs:
    """FunnelArgs from a FunnelConfig (the jobs' one typed config)."""
    from pathlib import Path

    from training.registry import setup_tracking

    setup_tracking(cfg.tracking)  # resolves a relative SQLite path the way training wrote it
    import mlflow

    return FunnelArgs(data_dir=str(Path(data_dir or cfg.data.output).resolve()), tracking_uri=mlflow.get_tracking_uri(),
                      serve=cfg.serve, abtest=cfg.abtest, max_ts=cfg.data.max_ts)
