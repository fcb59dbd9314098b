"""The A/B's traffic: N simulated users of the world (abtest.num_users, each abtest.requests_per_user
requests) call /recommend, and the world's click model answers.

Their traffic follows the world's own traffic model, as in the logs: sessions start at random
times of the A/B horizon and hold 1 + Poisson(requests per session) requests, Exp(60 s) + 5 s
apart; a user's requests go out in time order. The same ground-truth world that generated the
training logs (pipeline/world.py) decides each click, P(click | user state at ts, item,
position), and the clicks go back through /feedback, one call per slate, so the next request of
the session sees them, as a served history does. Requests fall after the log (`world.ab_days`;
jobs.loop moves the horizon on), so the users' interests have moved on since training, as in
production.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

from configs import FunnelConfig


def schedule(world, n: int, rng: np.random.Generator, horizon: tuple[int, int] | None = None) -> np.ndarray:
    """(n,) request times of one user, sorted: sessions as in the logs (pipeline/simulator.py) —
    a uniform start in the A/B horizon (default the world's, right after the log; jobs.loop moves it
    on each round), 1 + Poisson(requests_per_session) requests, gaps of Exp(60 s) + 5 s — until n
    requests; all inside the horizon."""
    start, end = horizon or (world.log_end_ts, world.ab_end_ts)
    sizes = 1 + rng.poisson(world.cfg.requests_per_session, size=n)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    sizes[-1] -= int(sizes.sum()) - n
    starts = np.repeat(rng.integers(start, end - 3600, size=len(sizes)), sizes)
    gaps = rng.exponential(60.0, size=n).astype(np.int64) + 5
    cs = np.cumsum(gaps)
    within = cs - cs[np.repeat(np.cumsum(sizes) - sizes, sizes)]  # seconds since the session's first request
    return np.sort(starts + within)


def simulate(cfg: FunnelConfig, url: str, horizon: tuple[int, int] | None = None) -> dict[str, Any]:
    """Drive the world's users against `url` inside `horizon` (`schedule`); returns how many
    requests/clicks were sent."""
    from pipeline.world import get_world
    from serving.guard import read_token

    world = get_world(cfg.world)
    ab = cfg.abtest
    auth = {"Authorization": f"Bearer {read_token(cfg.serve.token_file)}"}
    rng = np.random.default_rng(ab.seed)
    users = world.users_table()
    known = users[users["registered_ts"] < world.log_end_ts]["user_id"].to_numpy()
    chosen = rng.choice(known, size=min(ab.num_users, len(known)), replace=False)
    jobs = [(str(u), schedule(world, ab.requests_per_user, rng, horizon), int(rng.integers(0, 2**31))) for u in chosen]
    http = requests.Session()
    errors: list[str] = []
    bar = tqdm(total=len(chosen) * ab.requests_per_user, desc="A/B requests", unit="req",
               disable=not sys.stderr.isatty())

    sent: list[int] = []  # one entry per request (list.append is atomic across threads)
    served: list[str] = []  # the request ids this A/B was served: its rows of the event log

    def one(user: str, ts: int, click_rng: np.random.Generator) -> int:
        r = http.post(f"{url}/recommend", json={"user_id": user, "k": ab.slate_size, "ts": ts}, timeout=120)
        sent.append(1)
        bar.update()
        if r.status_code != 200:
            errors.append(f"{r.status_code} {r.text[:200]}")
            return 0
        rec = r.json()
        served.append(rec["request_id"])
        items = np.array([int(i) for i in rec["items"]])
        pos = np.arange(len(items))
        clicked = world.sample_clicks(np.full(len(items), int(user)), items, pos, np.full(len(items), ts), click_rng)
        if clicked.any():  # one call per slate with all its clicks
            http.post(f"{url}/feedback", json={"user_id": user, "request_id": rec["request_id"],
                                               "ts": ts, "clicks": [{"item_id": rec["items"][p], "position": int(p)}
                                                                    for p in pos[clicked]]},
                      headers=auth, timeout=120).raise_for_status()
        return int(clicked.sum())

    def user_requests(job: tuple[str, np.ndarray, int]) -> int:
        user, times, seed = job  # in time order: each request sees the clicks fed back before it
        click_rng = np.random.default_rng(seed)
        return sum(one(user, int(ts), click_rng) for ts in times)

    with ThreadPoolExecutor(ab.concurrency) as pool:
        clicks = sum(pool.map(user_requests, jobs))
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(sent)} A/B requests failed; first: {errors[0]}")
    http.post(f"{url}/flush", headers=auth, timeout=120).raise_for_status()
    return {"requests": len(sent), "clicks": clicks, "users": len(chosen), "request_ids": served}
