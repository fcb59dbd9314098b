"""The funnel's three stages as Serve deployments, each a registry model held by alias.

`RetrieverStage`, `PrerankerStage` and `RankerStage` wrap the plain stage objects of
serving/funnel.py. They speak item and user *keys* (the pipeline's dense integers), never id
strings: the ingress (serving/ingress.py) resolves a request's user, history and candidates
once and maps the served keys back to ids once. Every method returns `(Scored, version)`, the
version being the registry version that produced it.

Two placements (`serve.colocate`, serving/app.py):
- co-located (default; one machine): the ingress replica builds the three stage objects
  itself, from these same classes, and awaits their methods in-process — no handle hop, one
  FeatureStore for all;
- one deployment per stage (`serve.colocate: false`; a cluster): the ingress calls them
  through deployment handles and the stages scale apart.

Models load from the MLflow registry by alias (`models:/funnel-<model>@<alias>`); each stage
checks the alias every `reload_s` seconds and, when it moved, loads the new version beside the
old one and swaps — requests in flight finish on the old model, none is dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve

from serving.schemas import FunnelArgs


class _Registered:
    """A model held by alias: load, and reload when the alias points elsewhere."""

    def __init__(self, args: FunnelArgs, model: str, alias: str, own_replica: bool = False):
        """`own_replica`: this stage is a deployment of its own (not built by the co-located ingress,
        which freezes its heap once everything is loaded): freeze it here (serving/pauses.py)."""
        import mlflow

        from training.registry import registered_name

        mlflow.set_tracking_uri(args.tracking_uri)
        self.args, self.alias = args, alias
        self.name = registered_name(model)
        self.version = ""
        self._load()
        self._task = None
        if own_replica and args.serve.gc_freeze:
            from serving.pauses import freeze

            freeze()

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
            try:  # the registry query off the event loop too: a SQL round trip (3-40 ms) per stage
                loop = asyncio.get_running_loop()
                if await loop.run_in_executor(None, self._resolve) != self.version:
                    await loop.run_in_executor(None, self._load)
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

    async def reload_now(self) -> str:
        """`check_reload` off the event loop (requests keep flowing); the version now served."""
        await asyncio.get_running_loop().run_in_executor(None, self.check_reload)
        return self.version


def _batched(method, args: FunnelArgs):
    """`method` (a bound method: this stage object's) behind a `serve.batch` queue of its own. The
    decorator on the class would keep ONE queue for every instance and run each batch on its first
    request's instance: co-located stages of two aliases (funnel@champion against funnel@challenger
    in one ingress replica) served each other's requests (tests/unit/test_stage_batching.py)."""
    s = args.serve
    return serve.batch(max_batch_size=max(1, s.max_batch_size),
                       batch_wait_timeout_s=s.batch_wait_ms / 1000.0 if s.max_batch_size > 1 else 0.0)(method)


def _store(args: FunnelArgs, store=None):
    """The colocated ingress's store, else this replica's own (reading the shared state with
    serve.state_backend "actor", a copy of it with "replicated")."""
    from serving.features import FeatureStore

    if store is not None:
        return store
    from serving.state_store import state_backend

    shared = state_backend(args)
    return FeatureStore(args.data_dir, state=shared[0] if shared else None)


@serve.deployment
class RetrieverStage(_Registered):
    def __init__(self, args: FunnelArgs, alias: str, store=None):
        self.store = _store(args, store)
        super().__init__(args, args.serve.retriever, alias, own_replica=store is None)
        self._retrieve_batch = _batched(self._retrieve_many, args)

    def build(self, model) -> None:
        from serving.funnel import Retriever
        from serving.index_build import index_for_version

        index = index_for_version(model, self.run_id, self.pending_version, self.args.data_dir,
                                  self.args.serve.index_factory)
        self.stage = Retriever(model, index, self.store, self.args.serve.popular_n)

    async def retrieve_keys(self, user_key: int, hist: np.ndarray, n: int, ts: int | None = None) -> tuple[Any, str]:
        """The top n of FAISS ∪ the popularity channel for one user (key, history keys) at ts (the
        two-tower's user tower reads the user's counters as of ts)."""
        self.ensure_watch()
        return await self._retrieve_batch((user_key, hist, n, ts))

    async def _retrieve_many(self, reqs: list[tuple[int, np.ndarray, int, int | None]]) -> list[tuple[Any, str]]:
        """Concurrent requests → one user-tower forward and one FAISS search per distinct n."""
        stage, version = self.stage, self.version
        out: list[Any] = [None] * len(reqs)
        for n in {r[2] for r in reqs}:
            idx = [i for i, r in enumerate(reqs) if r[2] == n]
            for i, res in zip(idx, stage.retrieve_many([reqs[i][0] for i in idx], [reqs[i][1] for i in idx], n,
                                                        [reqs[i][3] for i in idx]), strict=True):
                out[i] = (res, version)
        return out


@serve.deployment
class PrerankerStage(_Registered):
    def __init__(self, args: FunnelArgs, alias: str, store=None):
        self.store = _store(args, store)
        super().__init__(args, args.serve.preranker, alias, own_replica=store is None)

    def build(self, model) -> None:
        from serving.funnel import Preranker

        self.stage = Preranker(model, self.store, self.args.serve.retrieval_weight,
                               short_exact=self.args.serve.lrea_short_exact)

    async def prerank_keys(self, user_key: int, hist: np.ndarray, cands, m: int, ts: int) -> tuple[Any, str]:
        """The top m of `cands` (a Scored: keys and retrieval scores) released at ts; `.pos` indexes `cands`."""
        self.ensure_watch()
        stage, version = self.stage, self.version
        return stage.prerank(user_key, hist, cands, m, ts), version


@serve.deployment
class RankerStage(_Registered):
    def __init__(self, args: FunnelArgs, alias: str, store=None):
        self.store = _store(args, store)
        super().__init__(args, args.serve.ranker, alias, own_replica=store is None)
        self._rank_batch = _batched(self._rank_many, args)

    def build(self, model) -> None:
        from serving.funnel import Ranker

        self.stage = Ranker(model, self.store, self.args.serve.prerank_weight)

    async def rank_keys(self, user_key: int, hist: np.ndarray, hist_ts: np.ndarray, keys: np.ndarray, k: int,
                        ts: int, prior: np.ndarray | None = None) -> tuple[Any, str]:
        """The top k of the candidate keys with probabilities; `.pos` indexes `keys`. `hist_ts`: each
        history entry's click time (0 = unknown), for the behaviors' age. `prior`: the candidates'
        pre-rank scores (the funnel sends them), fused with weight serve.prerank_weight."""
        self.ensure_watch()
        return await self._rank_batch((user_key, hist, keys, k, ts, hist_ts, prior))

    async def _rank_many(self, reqs: list[tuple]) -> list[tuple[Any, str]]:
        """Concurrent requests → one forward pass over all their candidates."""
        stage, version = self.stage, self.version
        return [(res, version) for res in stage.rank_many(reqs)]


STAGES = {"retriever": RetrieverStage, "preranker": PrerankerStage, "ranker": RankerStage}
