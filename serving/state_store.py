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
"""

from __future__ import annotations

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
    """The `serving.router.ServedRequests` interface the ingress uses, answered by the actor."""

    def add(self, request_id: str, served) -> None:
        self._get(self.actor.served_call.remote("add", request_id, served))

    def get(self, request_id: str):
        return self._get(self.actor.served_call.remote("get", request_id))

    def claim_id(self, request_id: str, positions: list[int]) -> list[int]:
        return self._get(self.actor.served_call.remote("claim_id", request_id, positions))


def shared_state(data_dir: str, name: str, served_requests: int) -> tuple[SharedState, SharedServed]:
    """The named actor (created by the first replica that asks, found by the others) and its clients."""
    import ray

    actor = ray.remote(StateActor).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1,
    ).remote(data_dir, served_requests)
    return SharedState(actor), SharedServed(actor)


def shutdown(name: str) -> bool:
    """Kill the named state actor (after `serve.shutdown`); False if there was none."""
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        return False
    return True
