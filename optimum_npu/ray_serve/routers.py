"""Ray Serve request routers for the engine replicas: round-robin, least-loaded, prefix-aware.

Ray Serve asks a router, per request, for ranks of replicas (`choose_replicas`); among the
replicas of the first rank that has room (a queue below the deployment's max_ongoing_requests)
it picks the one with the shortest queue, probing queue lengths as it needs. So:

- round-robin ranks one replica, the next in turn: the baseline, blind to load and content;
- least-loaded ranks all replicas together: the shortest queue wins;
- prefix-aware ranks first the replica that served the longest prefix of this request's prompt
  (its vLLM prefix cache likely still holds those KV blocks), unless its queue is longer than
  the shortest by more than `imbalance`, then all replicas (least-loaded).

The ingress passes the prompt as the `routing_key` keyword (ingress.routing_key); prefixes are
kept at a granularity of `granularity` characters, as hashes, at most `max_prefixes` of them
(the oldest forgotten first), so memory stays bounded whatever the traffic.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

DEFAULT_GRANULARITY = 16
DEFAULT_MAX_PREFIXES = 100_000
DEFAULT_IMBALANCE = 8


def _routing_key(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get("routing_key")
    return key if isinstance(key, str) and key else None


class RoundRobinRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs):
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[ordered[next(self._turn) % len(ordered)]]]


class LeastLoadedRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)] if candidate_replicas else []


class PrefixAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, granularity: int = DEFAULT_GRANULARITY, max_prefixes: int = DEFAULT_MAX_PREFIXES,
                         imbalance: int = DEFAULT_IMBALANCE, **kwargs):
        self._granularity = granularity
        self._max_prefixes = max_prefixes
        self._imbalance = imbalance
        self._owner: OrderedDict[int, str] = OrderedDict()  # hash of a prefix -> replica that last served it

    def _prefix_hashes(self, key: str) -> list[int]:
        """Hashes of the key's prefixes of 1, 2, ... granules (whole granules only), shortest first."""
        g = self._granularity
        return [hash(key[: n * g]) for n in range(1, len(key) // g + 1)]

    def _queue_len(self, replica: RunningReplica) -> int | None:
        return self.replica_queue_len_cache.get(replica.replica_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        everyone = list(candidate_replicas)
        key = _routing_key(pending_request)
        if key is None:
            return [everyone]
        by_id = {r.replica_id.unique_id: r for r in everyone}
        for h in reversed(self._prefix_hashes(key)):  # the longest prefix served before
            owner = by_id.get(self._owner.get(h))
            if owner is None:
                continue
            lengths = [q for q in (self._queue_len(r) for r in everyone) if q is not None]
            mine = self._queue_len(owner)
            if lengths and mine is not None and mine - min(lengths) > self._imbalance:
                break  # the owner is busy: balance the load instead
            return [[owner], everyone]
        return [everyone]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        key = _routing_key(pending_request)
        if key is None:
            return
        for h in self._prefix_hashes(key):
            self._owner[h] = replica_id.unique_id
            self._owner.move_to_end(h)
        while len(self._owner) > self._max_prefixes:
            self._owner.popitem(last=False)


ROUTERS = {
    "round-robin": RoundRobinRouter,
    "least-loaded": LeastLoadedRouter,
    "prefix-aware": PrefixAwareRouter,
}


def router_class(name: str) -> type[RequestRouter]:
    """The router class of a name; ValueError naming the allowed names."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"router={name!r}: expected one of {', '.join(ROUTERS)}") from None
