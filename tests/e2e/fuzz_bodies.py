"""Malformed request bodies for the served funnel, as hypothesis strategies, by class.

Each draw is (class, path, body bytes, headers, mode): mode "chunked" sends the body without
a Content-Length, "token" adds the valid bearer token, "plain" neither. The classes follow what a client can get
wrong: bytes that are not UTF-8, text that is not JSON, JSON that is not an object,
non-finite numbers, unbounded integers, wrong types and values in an otherwise valid body,
unknown and missing fields, bodies over the size limit (with and without Content-Length:
chunked ones are generators), and /feedback without the token or for a request never served.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

ENDPOINTS = ("/retrieve", "/prerank", "/rank", "/recommend", "/feedback", "/flush")
JSON_HEADERS = {"content-type": "application/json"}


def valid_bodies(users: list[str], items: list[str], rid: str) -> dict[str, dict]:
    u = users[0]
    return {
        "/retrieve": {"user_id": u, "n": 20},
        "/prerank": {"user_id": u, "candidates": items[:20], "m": 5, "ts": 1_702_000_000},
        "/rank": {"user_id": u, "candidates": items[:20], "k": 5, "ts": 1_702_000_000},
        "/recommend": {"user_id": u, "k": 5, "ts": 1_702_000_000},
        "/feedback": {"user_id": u, "request_id": rid, "item_id": items[0], "position": 0, "ts": 1_702_000_000},
        "/flush": {},
    }


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                                                                                     allow_infinity=False),
                     st.text(max_size=40))
_json = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=5),
                                                   st.dictionaries(st.text(max_size=10), c, max_size=5)),
                     max_leaves=20)
_weird_values = st.one_of(_json, st.sampled_from([2**63, 2**64, -2**63 - 1, 10**30, "", "x" * 200, [], {}, [None],
                                                  -1, 0, 1.5, "1", True]))


def _dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def strategies(users: list[str], items: list[str], rid: str, max_bytes: int):
    good = valid_bodies(users, items, rid)
    paths = st.sampled_from(ENDPOINTS)
    path_and_body = paths.map(lambda p: (p, good[p]))

    def mutated(pb, key, value):
        p, b = pb
        b = dict(b)
        if b and key is None:
            key = sorted(b)[0]
        b[key if key is not None else "x"] = value
        return p, b

    not_utf8 = st.tuples(paths, st.binary(min_size=1, max_size=200)).map(
        lambda t: (t[0], b'{"user_id": "' + t[1] + b'\xff\xfe"}'))
    not_json = st.tuples(paths, st.text(min_size=1, max_size=200)).filter(lambda t: not _is_json(t[1])).map(
        lambda t: (t[0], t[1].encode()))
    not_object = st.tuples(paths, st.one_of(st.lists(_json, max_size=4), _scalars)).map(
        lambda t: (t[0], _dumps(t[1])))
    non_finite = st.tuples(path_and_body, st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])).map(
        lambda t: (t[0][0], _dumps({**t[0][1], "ts": 0})[:-1] + b', "k": ' + t[1].encode() + b"}"))
    huge_ints = st.tuples(path_and_body, st.sampled_from(["ts", "k", "n", "m", "position"]),
                          st.sampled_from([2**64, 2**63, 10**40, -2**64, 2**40])).map(
        lambda t: (t[0][0], _dumps({**t[0][1], t[1]: t[2]})))
    wrong_values = st.tuples(path_and_body, st.sampled_from(
        ["user_id", "history", "candidates", "k", "n", "m", "ts", "item_id", "position", "request_id", "clicks", None]),
        _weird_values).map(lambda t: (lambda pb: (pb[0], _dumps(pb[1])))(mutated(t[0], t[1], t[2])))
    fields = st.tuples(path_and_body, st.sets(st.sampled_from(["user_id", "candidates", "request_id", "item_id",
                                                               "position", "k", "ts"]), max_size=3),
                       st.dictionaries(st.text(min_size=1, max_size=12).map(lambda k: "x_" + k), _scalars,
                                       min_size=1, max_size=3)).map(  # ≥ 1 unknown field: never a valid body
        lambda t: (t[0][0], _dumps({**{k: v for k, v in t[0][1].items() if k not in t[1]}, **t[2]})))
    oversized = st.tuples(paths, st.integers(max_bytes + 1, 4 * max_bytes), st.booleans()).map(
        lambda t: (t[0], (b'{"user_id": "' + b"x" * t[1] + b'"}'), t[2]))
    feedback = st.tuples(st.sampled_from(["none", "wrong", "unknown_request"]), st.text(min_size=1, max_size=30)).map(
        lambda t: ("/feedback", t[0], _dumps({**good["/feedback"], "request_id": t[1] + "-never"})))

    def case(cls, s):
        return s.map(lambda pb: (cls, pb[0], pb[1], dict(JSON_HEADERS), "plain"))

    return st.one_of(
        case("not UTF-8", not_utf8),
        case("not JSON", not_json),
        case("JSON, not an object", not_object),
        case("NaN / Infinity / 1e999", non_finite),
        case("integers out of range (2^64, 10^40, ...)", huge_ints),
        case("wrong type or value in a valid body", wrong_values),
        case("unknown or missing fields", fields),
        oversized.map(lambda t: ("over the size limit (chunked or not)", t[0], t[1], dict(JSON_HEADERS),
                                    "chunked" if t[2] else "plain")),
        feedback.map(lambda t: ("/feedback: no token, wrong token, unserved request", t[0], t[2],
                                {**JSON_HEADERS, **({"Authorization": "Bearer nope"} if t[1] == "wrong" else {})},
                                "token" if t[1] == "unknown_request" else "plain")),
    )


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
