"""Several ingress replicas: a shared online state, and a killed replica losing no flushed event."""

from __future__ import annotations

import pandas as pd
import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]  # the e2e fixture runs every stage


@pytest.mark.parametrize("backend", ["actor", "replicated"])
def test_two_ingress_replicas_share_one_online_state(backend, user_ids, served, e2e_run, tmp_path):
    """serve.state_backend "actor" or "replicated" (serving/state_store.py), a second app with two
    ingress replicas: a slate served by either replica takes its click through either, and every
    replica then reads the same counters and the user's history (with "replicated", once the copies
    have synced: serve.state_sync_ms)."""
    import dataclasses
    import time

    from ray import serve

    from configs import load_config
    from serving.app import args_from_config, build_app
    from serving.state_store import shutdown

    cfg = load_config(e2e_run["args"][1], e2e_run["args"][3::2])
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(
        cfg.serve, state_backend=backend, state_actor=f"funnel-state-two-replicas-{backend}", ingress_replicas=2,
        user_code_thread=backend == "actor",  # Serve's own default, so both settings are served in the suite
        throughput_optimized=backend == "replicated",  # and Serve's throughput mode
        event_log=str(tmp_path / "events"), token_file=str(e2e_run["root"] / "runs" / "serve_token")))
    args = args_from_config(cfg, str(e2e_run["processed"]))
    serve.run(build_app(args), name=f"shared-{backend}", route_prefix=f"/shared-{backend}")
    url = f"{e2e_run['proxy_url']}/shared-{backend}"
    auth = {"Authorization": f"Bearer {(e2e_run['root'] / 'runs' / 'serve_token').read_text().strip()}"}
    try:
        def by_replica() -> dict[str, dict]:
            seen: dict[str, dict] = {}
            for _ in range(80):
                h = requests.get(f"{url}/healthz", timeout=30).json()
                seen[h["replica"]] = h["state"]
                if len(seen) == 2:
                    break
            return seen

        before = by_replica()
        assert len(before) == 2 and all(s["backend"] == backend for s in before.values()), before
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["user_code_thread"] is (backend == "actor")
        assert health["throughput_optimized"] is (backend == "replicated")
        users = user_ids[:3]
        t = 1_702_000_000
        for i, user in enumerate(users * 4):  # slates and clicks land on either replica
            rec = requests.post(f"{url}/recommend", json={"user_id": user, "k": 3, "ts": t + i}, timeout=60).json()
            r = requests.post(f"{url}/feedback", json={"user_id": user, "request_id": rec["request_id"],
                                                       "item_id": rec["items"][0], "position": 0, "ts": t + i + 1},
                              headers=auth, timeout=60)
            assert r.status_code == 200 and r.json()["clicks"] == 1, r.text  # the registry is shared too
        base = next(iter(before.values()))
        # "replicated": each copy has the other's writes after that one's next sync, so a slate's exposures (written
        # by the replica that served it) can reach the other copy after the click that copy took itself: wait for both
        for _ in range(50):
            after = by_replica()
            if all(s["online_clicks"] - base["online_clicks"] == 12 and s["exposures"] - base["exposures"] == 36
                   for s in after.values()):
                break
            time.sleep(0.1)
        assert len(after) == 2
        for rid, s in after.items():
            assert s["online_clicks"] - base["online_clicks"] == 12, (rid, s)
            assert s["exposures"] - base["exposures"] == 36, (rid, s)
            assert s.get("lost_events", 0) == 0 and s.get("sync_failures", 0) == 0, (rid, s)
        hist = set()
        for _ in range(10):  # the user's fed-back clicks are in the history whichever replica ranks
            r = requests.post(f"{url}/retrieve", json={"user_id": users[0], "n": 5, "ts": t + 100}, timeout=60)
            assert r.status_code == 200, r.text
            hist.add(tuple(r.json()["items"]))
        assert len(hist) == 1  # the same history (hence the same user vector) on both replicas
    finally:
        serve.delete(f"shared-{backend}")
        shutdown(f"funnel-state-two-replicas-{backend}")


def test_killing_the_ingress_replica_loses_no_flushed_event(user_ids, served, tiny_processed, e2e_run):
    """Last in this module: it kills the funnel's replica (a crash: no graceful shutdown) while
    /recommend traffic flows. Every request acknowledged before the killed replica's last
    segment snapshot has all its exposures on disk; what was acknowledged after it is the loss
    window (at most serve.event_log_flush_s), reported with the counts."""
    import threading
    import time

    import ray

    from configs import load_config
    from pipeline.readers import read_event_segments

    url, log_dir = served
    users = user_ids
    acked: dict[str, tuple[float, int]] = {}  # request id -> (acknowledged at, exposures)
    sent, errors, stop = [0], [0], threading.Event()

    def traffic():
        k = 0
        while not stop.is_set():
            sent[0] += 1
            try:
                r = requests.post(f"{url}/recommend", json={"user_id": users[k % len(users)], "k": 5}, timeout=10)
            except requests.RequestException:
                errors[0] += 1
                continue
            if r.status_code == 200:
                acked[r.json()["request_id"]] = (time.time(), len(r.json()["items"]))
            else:
                errors[0] += 1
            k += 1

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(5.0)  # more than two flush windows
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::funnel#Funnel")]
        assert len(replicas) == 1, replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed_at = time.time()
        time.sleep(1.0)
    finally:
        stop.set()
        t.join()
    before_kill = {rid: v for rid, v in acked.items() if v[0] < killed_at}
    segments = sorted(log_dir.glob("events-*.parquet"))
    ev = read_event_segments(log_dir)
    on_disk = ev[ev["request_id"].isin(before_kill)].groupby("request_id").size()
    # the killed replica's segments: those holding this test's requests
    ours = [p for p in segments if pd.read_parquet(p, columns=["request_id"])["request_id"].isin(before_kill).any()]
    last_snapshot = max(int(p.name.split("-")[1]) for p in ours) / 1000.0
    due = {rid: n for rid, (at, n) in before_kill.items() if at < last_snapshot}
    lost = [rid for rid, n in due.items() if on_disk.get(rid, 0) != n]
    window = len(before_kill) - len(due)
    print(f"\nreplica kill: {sent[0]} requests sent, {len(acked)} acknowledged ({len(before_kill)} before the kill), "
          f"{errors[0]} failed; {len(due)} acknowledged before the last flush, {len(lost)} of them lost; "
          f"{window} acknowledged in the unflushed window ({killed_at - last_snapshot:.2f} s)")
    assert due and not lost
    assert killed_at - last_snapshot <= load_config(e2e_run["args"][1]).serve.event_log_flush_s + 1.0
