"""The served funnel on the tiny world: registry aliases → Ray Serve over real HTTP on 127.0.0.1.

Models are registered untrained (tiny presets): these tests are about serving — loading by
alias, composition, validation, routing, the event log, reload — not model quality.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tiny_cfg, tiny_processed, tmp_path_factory):
    import dataclasses

    from training.registry import log_run, register_with_gate
    from training.tasks import make_task

    root = tmp_path_factory.mktemp("serve_registry")
    tracking = dataclasses.replace(tiny_cfg.tracking, uri=f"sqlite:///{root / 'mlflow.db'}",
                                   artifact_location=str(root / "artifacts"))
    cfg = dataclasses.replace(tiny_cfg, tracking=tracking)
    for name in ("karma", "lrea", "cdnet"):
        task = make_task(name, tiny_processed, seq_len=20 if name == "karma" else 0)
        model = task.build(name, None, tiny=True)
        metric = f"test_{task.metric}"
        run_id = log_run(cfg, name, None, [], {metric: 0.5}, tiny_processed, model, task.spec, tiny=True)
        assert register_with_gate(name, run_id, metric=metric)["challenger"]
    return cfg


@pytest.fixture(scope="module")
def served(ray_session, registry, tiny_processed, tmp_path_factory):
    from ray import serve

    from serving.app import FunnelArgs, build_app

    port = _free_port()
    log = tmp_path_factory.mktemp("served_events")
    args = FunnelArgs(data_dir=str(tiny_processed), tracking_uri=registry.tracking.uri, top_n=50, top_m=20,
                      popular_n=10, reload_s=0, event_log=str(log), replica_cpus=0.1,
                      arms={"control": 50, "treatment": 50},
                      variants={"control": "popularity", "treatment": "funnel@challenger"})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="funnel", route_prefix="/")
    yield f"http://127.0.0.1:{port}", log
    serve.shutdown()


def _users(root, n=40):
    import pandas as pd

    return pd.read_parquet(root / "users.parquet")["user_id"].astype(str).head(n).tolist()


def test_endpoints_compose_and_route(served, tiny_processed):
    url, log = served
    import pandas as pd

    items = pd.read_parquet(tiny_processed / "items.parquet")["item_id"].astype(str).tolist()
    r = requests.post(f"{url}/retrieve", json={"user_id": _users(tiny_processed)[0], "n": 30}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["items"]
    assert len(got) >= 30 and set(got) <= set(items) and r.json()["model_version"] == "1"
    r = requests.post(f"{url}/prerank", json={"user_id": "u-unknown", "candidates": items[:50], "m": 10}, timeout=60)
    assert r.status_code == 200 and len(r.json()["items"]) == 10  # an unknown user takes the cold-start path
    r = requests.post(f"{url}/rank", json={"user_id": _users(tiny_processed)[1], "candidates": [*items[:40], "new-item"],
                                           "k": 5}, timeout=60)
    body = r.json()
    assert r.status_code == 200 and len(body["items"]) == 5 and body["scores"] == sorted(body["scores"], reverse=True)
    arms = {}
    for u in _users(tiny_processed):
        rec = requests.post(f"{url}/recommend", json={"user_id": u, "k": 5, "ts": 1_702_000_000}, timeout=60).json()
        assert len(rec["items"]) == 5
        arms.setdefault(u, set()).add(rec["arm"])
        again = requests.post(f"{url}/recommend", json={"user_id": u, "k": 5}, timeout=60).json()
        arms[u].add(again["arm"])
        if rec["arm"] == "treatment":
            assert rec["stages"] == {"retriever": "1", "preranker": "1", "ranker": "1"}
        requests.post(f"{url}/feedback", json={"user_id": u, "request_id": rec["request_id"], "item_id": rec["items"][0],
                                               "position": 0, "arm": rec["arm"]}, timeout=60).raise_for_status()
    assert all(len(a) == 1 for a in arms.values())  # sticky
    assert {next(iter(a)) for a in arms.values()} == {"control", "treatment"}
    assert requests.post(f"{url}/flush", timeout=60).json()["written"]
    from serving.router import read_events

    ev = read_events(log)
    assert set(ev["event"]) == {"impression", "click"} and (ev["event"] == "click").sum() == 40
    assert len(ev[ev["event"] == "impression"]) == 80 * 5


def _bad_requests(users, items):
    u = users[0]
    big = ["x"] * 5000
    bodies = [
        ("/recommend", "{not json"), ("/recommend", ""), ("/recommend", "[]"), ("/recommend", "null"),
        ("/rank", '{"user_id": "1", "candidates": ["1"], "k": 5'),
    ]
    cases = [(p, b) for p, b in bodies]
    js = [
        ("/recommend", {}), ("/recommend", {"user_id": 5}), ("/recommend", {"user_id": ""}),
        ("/recommend", {"user_id": "x" * 500}), ("/recommend", {"user_id": u, "k": 0}),
        ("/recommend", {"user_id": u, "k": 10_000}), ("/recommend", {"user_id": u, "k": "10"}),
        ("/recommend", {"user_id": u, "history": []}), ("/recommend", {"user_id": u, "history": big}),
        ("/recommend", {"user_id": u, "history": "1,2,3"}), ("/recommend", {"user_id": u, "history": [1, 2]}),
        ("/recommend", {"user_id": u, "ts": -5}), ("/recommend", {"user_id": u, "ts": "yesterday"}),
        ("/recommend", {"user_id": u, "extra": 1}), ("/recommend", {"user_id": None}),
        ("/recommend", {"user_id": [u]}), ("/recommend", {"user_id": u, "k": 1.5}),
        ("/rank", {"user_id": u}), ("/rank", {"user_id": u, "candidates": []}),
        ("/rank", {"user_id": u, "candidates": items[:1] * 501}), ("/rank", {"user_id": u, "candidates": "a,b"}),
        ("/rank", {"user_id": u, "candidates": [None]}), ("/rank", {"user_id": u, "candidates": items[:5], "k": -1}),
        ("/rank", {"user_id": u, "candidates": items[:5], "k": 501}), ("/rank", {"user_id": u, "candidates": [""]}),
        ("/rank", {"candidates": items[:5]}), ("/rank", {"user_id": u, "candidates": items[:5], "history": []}),
        ("/prerank", {"user_id": u}), ("/prerank", {"user_id": u, "candidates": []}),
        ("/prerank", {"user_id": u, "candidates": big}), ("/prerank", {"user_id": u, "candidates": items[:5], "m": 0}),
        ("/prerank", {"user_id": u, "candidates": items[:5], "m": "5"}),
        ("/prerank", {"user_id": u, "candidates": [3, 4]}), ("/prerank", {"user_id": u, "candidates": {"a": 1}}),
        ("/retrieve", {"user_id": u, "n": 0}), ("/retrieve", {"user_id": u, "n": 100_000}),
        ("/retrieve", {"user_id": u, "n": "all"}), ("/retrieve", {"user_id": 1}), ("/retrieve", {}),
        ("/retrieve", {"user_id": u, "history": [""]}), ("/retrieve", {"user_id": u, "history": big}),
        ("/feedback", {"user_id": u}), ("/feedback", {"user_id": u, "request_id": "r", "item_id": "i", "position": -1,
                                                      "arm": "a"}),
        ("/feedback", {"user_id": u, "request_id": "r", "item_id": "i", "position": "0", "arm": "a"}),
    ]
    cases += [(p, json.dumps(b)) for p, b in js]
    cases.append(("/rank", json.dumps({"user_id": u, "candidates": ["i" * 100] * 3000})))  # oversized payload
    cases.append(("/nope", json.dumps({"user_id": u})))
    return cases


def test_bad_requests_get_4xx_and_the_service_keeps_answering(served, tiny_processed):
    import pandas as pd

    url, _ = served
    users = _users(tiny_processed)
    items = pd.read_parquet(tiny_processed / "items.parquet")["item_id"].astype(str).tolist()
    cases = _bad_requests(users, items)
    assert len(cases) >= 50
    codes = []
    for path, body in cases:
        r = requests.post(f"{url}{path}", data=body, headers={"content-type": "application/json"}, timeout=60)
        codes.append(r.status_code)
        assert 400 <= r.status_code < 500, (path, body[:80], r.status_code, r.text[:200])
        assert r.json().get("detail"), "a 4xx names its reason"
    assert 413 in codes and 422 in codes and 404 in codes
    ok = requests.post(f"{url}/recommend", json={"user_id": users[0], "k": 3}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3
