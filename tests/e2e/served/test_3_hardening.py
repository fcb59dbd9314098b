"""Bad input over real HTTP: 4xx for every malformed request, a hypothesis fuzz with no 5xx and
no dropped connection, 413 for oversized bodies."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]  # the e2e fixture runs every stage


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
        ("/feedback", {"user_id": u, "request_id": "r", "arm": "a"}),  # no click at all
        ("/feedback", {"user_id": u, "request_id": "r", "arm": "a", "item_id": "i"}),  # no position
        ("/feedback", {"user_id": u, "request_id": "r", "arm": "a", "item_id": "i", "position": 0,
                       "clicks": [{"item_id": "j", "position": 1}]}),  # both forms
        ("/feedback", {"user_id": u, "request_id": "r", "arm": "a", "clicks": []}),
        ("/feedback", {"user_id": u, "request_id": "r", "arm": "a", "clicks": [{"item_id": "j"}]}),
    ]
    cases += [(p, json.dumps(b)) for p, b in js]
    cases.append(("/rank", json.dumps({"user_id": u, "candidates": ["i" * 100] * 3000})))  # oversized payload
    cases.append(("/nope", json.dumps({"user_id": u})))
    return cases


def test_bad_requests_get_4xx_and_the_service_keeps_answering(user_ids, served, tiny_processed):

    url, _ = served
    users = user_ids
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


def test_fuzz_no_5xx_no_dropped_connection_on_any_body(user_ids, served, tiny_processed, auth):
    """≥ 1,000 malformed bodies (hypothesis, by class: tests/e2e/fuzz_bodies.py) across every
    endpoint over real HTTP, while good /rank requests flow beside them: every bad body gets a
    4xx with a reason (or, where a draw happens to be a valid body, a 2xx for a body the
    request schema accepts), no connection is dropped, every good request is a 200, and the service
    answers afterwards. With FUNNEL_FUZZ_REPORT=path the table (class × status) and the good
    requests' latency percentiles are written there as JSON."""
    import os
    import threading
    import time
    from collections import Counter

    import numpy as np
    from hypothesis import HealthCheck, given, settings

    from serving.schemas import MAX_BODY_BYTES, PrerankRequest, RankRequest, RecommendRequest, RetrieveRequest
    from tests.e2e.fuzz_bodies import strategies, valid_bodies

    schemas = {"/retrieve": RetrieveRequest, "/prerank": PrerankRequest, "/rank": RankRequest,
               "/recommend": RecommendRequest}

    url, _ = served
    users = user_ids
    items = pd.read_parquet(tiny_processed / "items.parquet")["item_id"].astype(str).tolist()
    rid = requests.post(f"{url}/recommend", json={"user_id": users[0], "k": 5, "ts": 1_702_000_000},
                        timeout=60).json()["request_id"]
    good = valid_bodies(users, items, rid)["/rank"]
    table: Counter = Counter()
    failures: list[str] = []
    latencies: list[float] = []
    good_codes: Counter = Counter()
    stop = threading.Event()

    def good_traffic():
        with requests.Session() as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                good_codes[http.post(f"{url}/rank", json=good, timeout=60).status_code] += 1
                latencies.append(time.perf_counter() - t0)

    http = requests.Session()

    @settings(max_examples=1100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategies(users, items, rid, MAX_BODY_BYTES))
    def one(case):
        cls, path, body, headers, mode = case
        if mode == "token":
            headers = {**headers, **auth}
        data = (b for b in (body[: len(body) // 2], body[len(body) // 2:])) if mode == "chunked" else body
        try:
            r = http.post(f"{url}{path}", data=data, headers=headers, timeout=60)
        except requests.RequestException as e:  # a dropped or reset connection
            table[(cls, "no answer")] += 1
            failures.append(f"{cls} {path} {body[:60]!r}: {type(e).__name__}")
            return
        table[(cls, r.status_code)] += 1
        json_answer = r.headers.get("content-type", "").startswith("application/json")
        if 200 <= r.status_code < 300:  # a draw can be a valid body: then the schema must accept it too
            ok = json_answer and path in schemas and _validates(schemas[path], body)
        else:
            ok = 400 <= r.status_code < 500 and json_answer and bool(r.json().get("detail"))
        if not ok:
            failures.append(f"{cls} {path} {body[:60]!r} [{mode}]: {r.status_code} {r.text[:120]}")

    t = threading.Thread(target=good_traffic)
    t.start()
    try:
        one()
    finally:
        stop.set()
        t.join()
    sent = sum(table.values())
    lat = np.array(latencies) * 1000
    report = {"bad_bodies": sent, "by_class": {f"{c} → {code}": n for (c, code), n in sorted(table.items(), key=str)},
              "good_requests": dict(good_codes),
              "good_latency_ms": {q: float(np.percentile(lat, int(q[1:]))) for q in ("p50", "p90", "p99")}}
    if os.environ.get("FUNNEL_FUZZ_REPORT"):
        from pathlib import Path

        Path(os.environ["FUNNEL_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    assert sent >= 1000, report
    assert not failures, failures[:10]
    assert set(good_codes) == {200} and len(latencies) > 10, report
    assert len({c for c, _ in table}) == 9  # every class was drawn
    ok = requests.post(f"{url}/recommend", json={"user_id": users[0], "k": 3}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3 and requests.get(f"{url}/healthz").ok


def _validates(model, body: bytes) -> bool:
    import pydantic

    try:
        model.model_validate_json(body)
    except (pydantic.ValidationError, ValueError):
        return False
    return True


def test_oversized_bodies_get_413_with_or_without_content_length(served):
    """20 MB with a Content-Length, and 2 MB chunked (no Content-Length): a 413 the client can
    read (no reset connection); the body is never held whole."""
    url, _ = served
    big = b'{"user_id": "' + b"x" * 20_000_000 + b'"}'
    r = requests.post(f"{url}/recommend", data=big, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 413 and "payload larger" in r.json()["detail"]
    chunks = (b"x" * 65_536 for _ in range(32))
    r = requests.post(f"{url}/rank", data=chunks, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 413 and "payload larger" in r.json()["detail"]
    r = requests.post(f"{url}/rank", data=b'{"user_id": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["detail"]
    r = requests.post(f"{url}/recommend", data=b'{"user_id": "1", "k": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "NaN" in r.json()["detail"]
