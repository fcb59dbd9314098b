"""Co-located stages of two aliases (an A/B of funnel@champion against funnel@challenger in one ingress
replica) must batch apart. `serve.batch` on a method keeps ONE queue per decorated function, shared by
every instance of the class, and runs a batch on its first request's instance: with the decorator on
the class, the champion arm's requests were served by the challenger's models and the other way round
(seen in a 2-round loop on the small world: four version sets in one arm's exposures)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from configs import load_config
from serving.schemas import FunnelArgs


class _Stage:
    """Stands in for serving.funnel's stage objects: answers with the alias whose models it holds."""

    def __init__(self, alias: str):
        self.alias = alias

    def rank_many(self, reqs):
        return [self.alias] * len(reqs)

    def retrieve_many(self, users, hists, n, ts):
        return [self.alias] * len(users)


@pytest.fixture
def stages(monkeypatch):
    from ray.serve import batching

    from serving import stages as st

    # the batch queue's warning reads the replica context, which exists only inside a Serve replica
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)

    def registered(self, args, model, alias, own_replica=False):  # the registry load, without a registry: the stage of its alias
        self.args, self.alias, self.version, self._task = args, alias, alias, None
        self.stage = _Stage(alias)

    monkeypatch.setattr(st._Registered, "__init__", registered)
    cfg = load_config("configs/tiny.yaml")
    args = FunnelArgs(data_dir="x", serve=cfg.serve.__class__(**{**cfg.serve.__dict__, "reload_s": 0}))
    store = object()
    return {kind: [cls.func_or_class(args, alias, store=store) for alias in ("champion", "challenger")]
            for kind, cls in (("ranker", st.RankerStage), ("retriever", st.RetrieverStage))}


def test_co_located_stages_of_two_aliases_serve_their_own_requests(stages):
    async def calls():
        hist = np.zeros(0, np.int64)
        rank = [s.rank_keys(1, hist, hist, np.arange(3), 2, 0) for _ in range(3) for s in stages["ranker"]]
        ret = [s.retrieve_keys(1, hist, 5, 0) for _ in range(3) for s in stages["retriever"]]
        return await asyncio.gather(*rank), await asyncio.gather(*ret)

    rank, ret = asyncio.run(calls())
    for got in (rank, ret):
        assert [version for _, version in got] == ["champion", "challenger"] * 3
        assert [res for res, _ in got] == ["champion", "challenger"] * 3
