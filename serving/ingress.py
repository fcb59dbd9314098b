"""The funnel's HTTP ingress: /retrieve, /prerank, /rank, /recommend (+ /feedback, /flush, /healthz).

`Funnel` (a FastAPI ingress deployment) validates requests (pydantic; a bad request is a 4xx
with the reason, never a 5xx: serving/guard.py), routes each user to an arm by a sticky hash
bucket, composes the stages (serving/stages.py) and logs every exposure (with the model versions
that served it) and every click in the canonical events format (serving/router.py).
`/feedback` and `/flush` take a bearer token (every endpoint with `serve.auth_all`); a click is
accepted only for a request this funnel served, once per (request id, position), under the
server's own record of the arm.

One request, one build of its user state: the user's key, history keys and click times (the
request's own history, or the log's followed by the clicks fed back before ts) are resolved
here once and handed to every stage; stages exchange integer item keys, and ids are mapped
back once, for the response. The stages are in this replica (`serve.colocate`, the default:
awaited in-process) or deployments of their own (awaited through handles).

(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations as types.)
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
from serving.schemas import (
    MAX_BODY_BYTES,
    FeedbackRequest,
    FunnelArgs,
    Items,
    PrerankRequest,
    RankRequest,
    Recommendation,
    RecommendRequest,
    RetrieveRequest,
)

api = FastAPI(title="Funnel", description="retrieval → pre-ranking → ranking, with an A/B router")
api.add_middleware(BodyGuard, max_bytes=MAX_BODY_BYTES)


@api.exception_handler(RequestValidationError)
async def _invalid(request, exc: RequestValidationError) -> JSONResponse:
    """422 with the reasons, rendered safely whatever the input held."""
    return JSONResponse(validation_error_body(exc.errors()), status_code=422)


def arm_aliases(args: FunnelArgs) -> list[str]:
    """The registry aliases the stages load, sorted: those the arms serve ("funnel@<alias>") and
    `serve.alias`; ["champion"] if none is named."""
    variants, arms = args.abtest.variants, args.abtest.arms
    bad = [v for v in variants.values() if v != "popularity" and not v.startswith("funnel@")]
    if bad or set(variants) != set(arms):
        raise ValueError(f"abtest.variants must name every arm as 'popularity' or 'funnel@<alias>': {variants}")
    named = {v.split("@", 1)[1] for v in variants.values() if v.startswith("funnel@")}
    return sorted(named | ({args.serve.alias} if args.serve.alias else set())) or ["champion"]


def stage_alias(args: FunnelArgs) -> str:
    """The alias /retrieve, /prerank and /rank serve: `serve.alias`, else "champion" when the
    stages load it, else the single alias they load; several and none named is an error."""
    loaded = arm_aliases(args)
    if args.serve.alias:
        return args.serve.alias
    if "champion" in loaded or len(loaded) == 1:
        return "champion" if "champion" in loaded else loaded[0]
    raise ValueError(f"serve.alias: the arms serve {loaded}; name the one /retrieve, /prerank and /rank serve")


def _versions(args: FunnelArgs, stages: dict[str, str]) -> str:
    """"funnel-karma/3,funnel-lrea/2,funnel-cdnet/5": the models that served a slate."""
    from training.registry import registered_name

    s = args.serve
    return ",".join(f"{registered_name(m)}/{stages.get(k, '?')}"
                    for k, m in (("retriever", s.retriever), ("preranker", s.preranker), ("ranker", s.ranker)))


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""


def _user_code_thread() -> bool:
    """Whether this replica runs the funnel's code on a loop of its own thread (Serve's default) or on
    the loop that serves its HTTP (`serve.user_code_thread: false`), as Serve read it at start-up."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD)


def _throughput_optimized() -> bool:
    """Whether this replica runs in Serve's throughput mode (`serve.throughput_optimized`), as Serve read it."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_THROUGHPUT_OPTIMIZED)


def _pick(ids: list[str], pos: np.ndarray) -> list[str]:
    """The request's own ids at the positions a stage chose."""
    return [ids[i] for i in pos.tolist()]


@serve.deployment
@serve.ingress(api)
class Funnel:
    def __init__(self, args: FunnelArgs, stages: dict[str, dict[str, Any]] | None = None):
        """`stages`: {"retriever" | "preranker" | "ranker": {alias: deployment handle}}, one deployment
        per stage; None (`serve.colocate`): the stage objects are built here, sharing this replica's
        FeatureStore, and awaited in-process."""
        from serving.features import FeatureStore
        from serving.guard import read_token
        from serving.pauses import GcPauses, freeze
        from serving.router import ArmRouter, EventLog, ServedRequests

        self.args = args
        self.token = read_token(args.serve.token_file)
        self.router = ArmRouter(args.abtest.arms, args.abtest.salt)
        from serving.state_store import state_backend

        shared = state_backend(args)
        self.store = FeatureStore(args.data_dir, state=shared[0] if shared else None)
        self.local = stages is None
        if stages is None:
            from serving.stages import STAGES

            stages = {kind: {a: cls.func_or_class(args, a, store=self.store) for a in arm_aliases(args)}
                      for kind, cls in STAGES.items()}
        self.stages = stages
        self.default = stage_alias(args)  # what /retrieve, /prerank and /rank serve
        self.log = EventLog(args.serve.event_log, args.serve.event_log_max_rows, args.serve.event_log_flush_s)
        self.served = shared[1] if shared else ServedRequests(args.serve.served_requests)
        self.popular = self.store.item_ids(self.store.popular[:100])  # the popularity arm's slate
        self.pauses = GcPauses().install()  # the collector's pauses, reported by /healthz
        if args.serve.gc_freeze:
            freeze()  # everything loaded so far is long-lived: no full collection walks it again

    async def _call(self, kind: str, alias: str, method: str, *a) -> Any:
        """A stage method, in-process or through its handle."""
        fn = getattr(self.stages[kind][alias], method)
        return await (fn(*a) if self.local else fn.remote(*a))

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

    def _user(self, req, ts: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The request's user key (0 = unknown: the cold-start path), history as item keys and each
        entry's click time (0 = unknown): the request's own history if it sends one (unknown items
        dropped), else the online state's: the logged clicks and those fed back, strictly before ts."""
        s = self.store
        u = s.user_key(req.user_id)
        if req.history is not None:
            keys = s.item_keys(req.history)
            return (u, *s.user_history_ts(u, keys[keys > 0]))
        return (u, *s.user_history_ts(u, ts=ts))

    @api.get("/healthz")
    def healthz(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        self._auth(authorization)
        return {"ok": True, "arms": self.args.abtest.arms, "variants": self.args.abtest.variants,
                "colocated": self.local, "stage_alias": self.default,
                "event_log": {"pending_rows": self.log.pending(), "written_rows": self.log.written_rows,
                              "failed_flushes": self.log.failed_flushes},
                "state": self.store.state.counters() | {"backend": self.args.serve.state_backend},
                "gc": self.pauses.snapshot(), "user_code_thread": _user_code_thread(),
                "throughput_optimized": _throughput_optimized(),
                "replica": _replica_id()}

    @api.post("/retrieve")
    async def retrieve(self, req: RetrieveRequest, authorization: str | None = Header(None)) -> Items:
        self._auth(authorization)
        ts = self._ts(req.ts)
        u, hist, _ = self._user(req, ts)
        res, v = await self._call("retriever", self.default, "retrieve_keys", u, hist, req.n, ts)
        released = self.store.first_seen[res.keys] <= ts  # an item not yet released is not a candidate
        return Items(items=self.store.item_ids(res.keys[released]), scores=res.scores[released].tolist(),
                     model_version=v)

    @api.post("/prerank")
    async def prerank(self, req: PrerankRequest, authorization: str | None = Header(None)) -> Items:
        from serving.funnel import Scored

        self._auth(authorization)
        ts = self._ts(req.ts)
        u, hist, _ = self._user(req, ts)
        keys = self.store.item_keys(req.candidates)
        res, v = await self._call("preranker", self.default, "prerank_keys", u, hist,
                                  Scored(keys, np.zeros(len(keys), np.float32)), req.m, ts)
        return Items(items=_pick(req.candidates, res.pos), scores=res.scores.tolist(), model_version=v)

    @api.post("/rank")
    async def rank(self, req: RankRequest, authorization: str | None = Header(None)) -> Items:
        self._auth(authorization)
        ts = self._ts(req.ts)
        u, hist, hist_ts = self._user(req, ts)
        res, v = await self._call("ranker", self.default, "rank_keys", u, hist, hist_ts,
                                  self.store.item_keys(req.candidates), req.k, ts)
        return Items(items=_pick(req.candidates, res.pos), scores=res.scores.tolist(), model_version=v)

    async def _funnel(self, alias: str, req: RecommendRequest, ts: int
                      ) -> tuple[np.ndarray, list[str], list[float], dict[str, str]]:
        """retrieve → pre-rank → rank on item keys; the slate's keys, ids, scores and stage versions."""
        a = self.args.serve
        u, hist, hist_ts = self._user(req, ts)
        got, rv = await self._call("retriever", alias, "retrieve_keys", u, hist, a.retrieve_top_n, ts)
        pre, pv = await self._call("preranker", alias, "prerank_keys", u, hist, got, a.prerank_top_m, ts)
        out, kv = await self._call("ranker", alias, "rank_keys", u, hist, hist_ts, pre.keys, req.k, ts,
                                   pre.scores if a.prerank_weight else None)
        return out.keys, self.store.item_ids(out.keys), out.scores.tolist(), {"retriever": rv, "preranker": pv,
                                                                             "ranker": kv}

    @api.post("/recommend")
    async def recommend(self, req: RecommendRequest, authorization: str | None = Header(None)) -> Recommendation:
        from serving.router import Served

        self._auth(authorization)
        ts = self._ts(req.ts)
        arm = self.router.arm(req.user_id)
        variant = self.args.abtest.variants.get(arm, "popularity")
        rid = uuid.uuid4().hex
        if variant == "popularity":
            items = self.popular[: req.k]
            keys = self.store.popular[: len(items)]  # self.popular is these keys' ids
            scores, stages, versions = list(np.linspace(1, 0.5, len(items))), {}, ""
        else:
            keys, items, scores, stages = await self._funnel(variant.split("@", 1)[1], req, ts)
            versions = _versions(self.args, stages)
        self.served.add(rid, Served(req.user_id, arm, items, versions, ts))
        self.log.exposures(req.user_id, items, ts, rid, arm, versions)
        self.store.observe_exposures(self.store.user_key(req.user_id, create=True), keys, ts)
        return Recommendation(items=items, scores=scores, request_id=rid, arm=arm, stages=stages)

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Clicks on a slate this funnel served: checked against what it showed, logged with the
        server's own arm and model versions, each (request id, position) once."""
        self._auth(authorization, required=True)
        ts = self._ts(req.ts)
        got = self.served.get(req.request_id)
        if got is None and not getattr(self.served, "wait_add", True):  # a slate registered without waiting
            await asyncio.sleep(self.served.retry_s)
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
        new = self.served.claim_id(req.request_id, [c.position for c in clicks])
        for p in new:
            self.log.click(req.user_id, got.items[p], ts, req.request_id, p, got.arm, got.versions)
        if new:  # counters and the history move together (pipeline/state.py)
            self.store.observe_clicks(self.store.user_key(req.user_id, create=True),
                                      self.store.item_keys([got.items[p] for p in new]), ts)
        return {"ok": True, "clicks": len(new), "duplicates": len(clicks) - len(new)}

    def __del__(self) -> None:
        """Serve's graceful replica shutdown: what the event log still holds goes to disk."""
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        close = getattr(getattr(getattr(self, "store", None), "state", None), "close", None)
        if close is not None:  # the replicated state's queued writes reach the other replicas
            close()

    @api.post("/flush")
    def flush(self, authorization: str | None = Header(None)) -> dict[str, str]:
        self._auth(authorization, required=True)
        path = self.log.flush()
        return {"written": str(path or "")}

    async def reload_now(self) -> dict[str, str]:
        """Every stage checks its alias now (tests; the stages do it every serve.reload_s) and
        says the version it serves: {"ranker@challenger": "4", ...}."""
        calls = {f"{kind}@{alias}": (st.reload_now() if self.local else st.reload_now.remote())
                 for kind, by_alias in self.stages.items() for alias, st in by_alias.items()}
        return dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
