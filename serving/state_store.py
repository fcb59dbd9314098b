"""The shared online state: one `pipeline.state.FeatureState` and one served-request registry in a
named Ray actor, read and updated by every ingress and stage replica (serve.state_backend "actor").

Why a Ray actor and not Redis: the state is the ingest's arrays plus per-user timelines, and the
rows are built next to it by the same NumPy code the ingest runs (`FeatureState.user_rows`), so one
call answers a request's counters for all its candidates; Ray is already every replica's runtime
(no extra server to install, start, secure or reach), and the actor lives on the cluster like the
replicas. What it costs: one actor call per row build and per update (a local call is ~0.3–1 ms),
and the actor is one process (its calls are serialised; the state's own lock keeps it consistent).
The actor is detached (it outlives a replica's restart, which is the point); `shutdown` kills it.

With the default "local" backend each replica keeps its own state: right for one ingress replica.

The "replicated" backend (`ReplicatedState`) takes the round trips off the request path: each replica
holds a copy of the state and reads it in-process, like "local". Its writes apply to its copy at once
and go, with the other replicas' writes, through one named actor (`StateLog`): a thread in each replica
sends what it wrote and fetches what the others wrote every serve.state_sync_ms, in one call. Every
write is commutative (pipeline/state.py), so the copies converge to the state one process would hold
after all the writes, in whatever order they arrive. What it costs: a replica sees another replica's
writes up to one sync late (its own at once). Two things cannot be merged later and go through the
actor when they happen: the key of a user born online (handed out once, then logged to every copy),
and the served-request registry that /feedback checks a click against (the slate is registered
without waiting; /feedback asks the actor, as with "actor"). A replica that starts replays the log
from its beginning; the actor keeps the last serve.state_log_max_events writes, and a replica that
would need older ones says so in /healthz (`lost_events`) rather than pretend it is in step.
"""

from __future__ import annotations

import collections
import itertools
import threading
import uuid
from typing import Any

import numpy as np

NAMESPACE = "funnel"


class StateActor:
    """The actor's body (wrapped with `ray.remote` by `shared_state`)."""

    def __init__(self, data_dir: str, served_requests: int):
        from pipeline.state import FeatureState
        from serving.router import ServedRequests

        self.state = FeatureState.load(data_dir)
        self.served = ServedRequests(served_requests)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.state, method)(*args)

    def served_call(self, method: str, *args: Any) -> Any:
        return getattr(self.served, method)(*args)


class _Remote:
    def __init__(self, actor):
        self.actor = actor

    def _get(self, ref):
        import ray

        return ray.get(ref)


class SharedState(_Remote):
    """The `FeatureState` interface serving reads, answered by the actor."""

    def online_key(self, user_id: str, create: bool = False) -> int:
        return self._get(self.actor.call.remote("online_key", user_id, create))

    def user_view(self, user_key: int, ts: int, length: int):
        return self._get(self.actor.call.remote("user_view", user_key, ts, length))

    def user_rows(self, user_key: int, item_keys: np.ndarray, ts: int, position=0) -> dict[str, np.ndarray]:
        return self._get(self.actor.call.remote("user_rows", user_key, item_keys, ts, position))

    def observe_exposures(self, user_key, item_keys, ts) -> None:
        self._get(self.actor.call.remote("observe_exposures", user_key, item_keys, ts))

    def observe_clicks(self, user_key, item_keys, click_ts) -> None:
        self._get(self.actor.call.remote("observe_clicks", user_key, item_keys, click_ts))

    def counters(self) -> dict[str, int]:
        return self._get(self.actor.call.remote("counters"))


class SharedServed(_Remote):
    """The `serving.router.ServedRequests` interface the ingress uses, answered by the actor.
    `wait_add=False`: a slate is registered without waiting for the actor (calls from one replica reach
    the actor in order), and a lookup that misses is asked once more after `retry_s` (the ingress's
    /feedback, without blocking its loop): the registration of a slate another replica served a moment
    ago may still be on its way."""

    def __init__(self, actor, wait_add: bool = True, retry_s: float = 0.05):
        super().__init__(actor)
        self.wait_add, self.retry_s = wait_add, retry_s

    def add(self, request_id: str, served) -> None:
        ref = self.actor.served_call.remote("add", request_id, served)
        if self.wait_add:
            self._get(ref)

    def get(self, request_id: str):
        return self._get(self.actor.served_call.remote("get", request_id))

    def claim_id(self, request_id: str, positions: list[int]) -> list[int]:
        return self._get(self.actor.served_call.remote("claim_id", request_id, positions))


class StateLog:
    """The replicated backend's actor (wrapped with `ray.remote` by `replicated_state`): every replica's
    writes in the order they arrived, the keys of users born online, and the served-request registry.

    An event is ("exposures" | "clicks", user key, item keys, ts) or ("key", user id, key); its sequence
    number is its place in the log (`base` is the first one still kept)."""

    def __init__(self, n_users: int, served_requests: int, max_events: int):
        from serving.router import ServedRequests

        self.n_users, self.max_events = n_users, max(1, int(max_events))
        self.events: collections.deque = collections.deque()  # (replica id, event)
        self.base = 0
        self.keys: dict[str, int] = {}
        self.served = ServedRequests(served_requests)

    def sync(self, replica: str, events: list[tuple], cursor: int) -> tuple[list[tuple], int, int]:
        """Append `replica`'s new writes; return the other replicas' writes from `cursor` on, the next
        cursor, and how many writes past `cursor` the log no longer holds (0 when in step)."""
        self.events.extend((replica, e) for e in events)
        while len(self.events) > self.max_events:
            self.events.popleft()
            self.base += 1
        lost = max(0, self.base - cursor)
        start = max(cursor, self.base) - self.base
        out = [e for r, e in itertools.islice(self.events, start, None) if r != replica]
        return out, self.base + len(self.events), lost

    def allocate(self, user_id: str) -> int:
        """The key of a user born online: the same for every replica that asks (0 past the cap)."""
        from pipeline.state import MAX_ONLINE_USERS

        k = self.keys.get(user_id, 0)
        if not k and len(self.keys) < MAX_ONLINE_USERS:
            k = self.keys[user_id] = self.n_users + len(self.keys)
            self.events.append(("", ("key", user_id, k)))  # every copy learns it at its next sync
        return k

    def served_call(self, method: str, *args: Any) -> Any:
        return getattr(self.served, method)(*args)


class ReplicatedState:
    """A replica's copy of the online state (`pipeline.state.FeatureState`), kept in step with the
    other replicas' copies through the `StateLog` actor (module docstring). Reads are the local
    copy's; writes apply to it and are queued for the next sync; a daemon thread syncs every `sync_s`."""

    def __init__(self, local, actor, sync_s: float = 0.02):
        self.local, self.actor, self.sync_s = local, actor, float(sync_s)
        self.id = uuid.uuid4().hex
        self._outbox: list[tuple] = []
        self._out_lock, self._sync_lock = threading.Lock(), threading.Lock()
        self.cursor = 0
        self.stats = {"synced_events": 0, "sent_events": 0, "sync_failures": 0, "lost_events": 0}
        self._stop = threading.Event()
        self.sync()  # a replica that starts replays what the others wrote before it
        self._thread = threading.Thread(target=self._run, name="state-sync", daemon=True)
        self._thread.start()

    # reads: the local copy

    @property
    def history(self):
        """The logged click timelines this copy was loaded with (`pipeline.history.HistoryStore`): the replica's
        FeatureStore reads these instead of loading them a second time."""
        return self.local.history

    def user_view(self, user_key: int, ts: int, length: int):
        return self.local.user_view(user_key, ts, length)

    def rows(self, *a, **kw):
        return self.local.rows(*a, **kw)

    def user_rows(self, *a, **kw):
        return self.local.user_rows(*a, **kw)

    def counters(self) -> dict[str, int]:
        return self.local.counters() | self.stats

    def online_key(self, user_id: str, create: bool = False) -> int:
        k = self.local.online_key(user_id, False)
        if k or not create:
            return k
        import ray

        k = int(ray.get(self.actor.allocate.remote(user_id)))  # rare: a user the log did not have, first write
        if k:
            self.local.adopt_online_key(user_id, k)
        return k

    # writes: here at once, the others at their next sync
    def observe_exposures(self, user_key, item_key, ts) -> None:
        self.local.observe_exposures(user_key, item_key, ts)
        self._queue(("exposures", user_key, item_key, ts))

    def observe_clicks(self, user_key, item_key, click_ts) -> None:
        self.local.observe_clicks(user_key, item_key, click_ts)
        self._queue(("clicks", user_key, item_key, click_ts))

    def _queue(self, event: tuple) -> None:
        e = tuple(np.array(x) if isinstance(x, np.ndarray) else x for x in event)  # a copy: the caller may reuse its array
        with self._out_lock:
            self._outbox.append(e)

    def _apply(self, event: tuple) -> None:
        kind, *a = event
        if kind == "exposures":
            self.local.observe_exposures(*a)
        elif kind == "clicks":
            self.local.observe_clicks(*a)
        elif kind == "key":
            self.local.adopt_online_key(*a)
        else:
            raise ValueError(f"unknown state event {kind!r}")

    def sync(self, timeout_s: float = 30.0) -> int:
        """Send the queued writes and apply the others'; the number applied (-1: the actor failed, and
        the writes stay queued for the next try)."""
        import ray

        with self._sync_lock:
            with self._out_lock:
                out, self._outbox = self._outbox, []
            try:
                got, cursor, lost = ray.get(self.actor.sync.remote(self.id, out, self.cursor), timeout=timeout_s)
            except Exception:  # the actor is restarting or the cluster is busy: keep the writes
                with self._out_lock:
                    self._outbox[:0] = out
                self.stats["sync_failures"] += 1
                return -1
            for e in got:
                self._apply(e)
            self.cursor = cursor
            self.stats["lost_events"] += lost
            self.stats["synced_events"] += len(got)
            self.stats["sent_events"] += len(out)
            return len(got)

    def _run(self) -> None:
        while not self._stop.wait(self.sync_s):
            self.sync()

    def close(self) -> None:
        """Stop the thread after one last sync (what is queued reaches the others)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sync(timeout_s=5.0)  # a replica's shutdown does not wait long on an actor that is gone


def replicated_state(data_dir: str, name: str, served_requests: int, sync_s: float, max_events: int,
                     history=None) -> tuple[ReplicatedState, SharedServed]:
    """This replica's copy of the state (from the ingest's snapshot, then the log) and the shared
    registry, both through the named `StateLog` actor (created by the first replica that asks)."""
    import ray

    from pipeline.state import FeatureState

    local = FeatureState.load(data_dir, history)
    actor = ray.remote(StateLog).options(
        name=f"{name}-replicated", namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1,
    ).remote(local.n_users, served_requests, max_events)  # online keys start past the catalogue's, as in FeatureState
    return ReplicatedState(local, actor, sync_s), SharedServed(actor, wait_add=False)


def shared_state(data_dir: str, name: str, served_requests: int) -> tuple[SharedState, SharedServed]:
    """The named actor (created by the first replica that asks, found by the others) and its clients."""
    import ray

    actor = ray.remote(StateActor).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1,
    ).remote(data_dir, served_requests)
    return SharedState(actor), SharedServed(actor)


def shutdown(name: str) -> bool:
    """Kill the named state actor and the replicated backend's log (`<name>-replicated`) after
    `serve.shutdown`; False if there was neither."""
    import ray

    killed = False
    for n in (name, f"{name}-replicated"):  # the "actor" backend's state, the "replicated" backend's log
        try:
            ray.kill(ray.get_actor(n, namespace=NAMESPACE))
            killed = True
        except ValueError:
            pass
    return killed


def state_backend(args) -> tuple[Any, Any] | None:
    """(online state, served-request registry) shared with the other replicas (serve.state_backend
    "actor": one state in an actor; "replicated": a copy here, in step with the others'), or None
    ("local": this replica's own, FeatureStore's default)."""
    s = args.serve
    if s.state_backend == "actor":
        return shared_state(args.data_dir, s.state_actor, s.served_requests)
    if s.state_backend == "replicated":
        return replicated_state(args.data_dir, s.state_actor, s.served_requests, s.state_sync_ms / 1000.0,
                                s.state_log_max_events)
    return None
