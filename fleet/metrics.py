"""Prometheus metrics of the fleet, per replica and region, in a registry of their own (one per router, so tests and
several routers in one process never collide). A gateway over the router serves it with its own at `GET /metrics`
(gateway/openai_api.py); `scripts/gateway.py --fleet_metrics_port` also serves it alone on a port of its own.

Series (every replica series carries `replica` and `region` labels; sum by region for a region's figure):
  meshserve_fleet_replica_up                    1 while the router routes to it (healthy, not draining)
  meshserve_fleet_replica_draining              1 while it reports draining
  meshserve_fleet_replica_load                  its load as a fraction of capacity (`fleet.policy.load_of`)
  meshserve_fleet_replica_slots / _slots_used / _waiting    from its last GetLoad
  meshserve_fleet_replica_kv_used_ratio         KV pages used / pages, last GetLoad
  meshserve_fleet_replica_kv_cached_ratio       KV pages only the prefix cache holds / pages
  meshserve_fleet_replica_in_flight             requests this router sent there that have not finished
  meshserve_fleet_replica_cost_per_hour         chips x price per chip-hour while it is up
  meshserve_fleet_requests_routed_total         picks (a failover's new attempt counts again)
  meshserve_fleet_prompt_tokens_total / _cached_tokens_total   from the finished streams' Usage: hit rate =
                                                cached / prompt
  meshserve_fleet_ejections_total{reason}       ejections (health, passive failures)
  meshserve_fleet_failovers_total{kind}         retry (no token yet), resume (mid-stream), failed (could not)
  meshserve_fleet_shed_total{reason}            refusals: absent, draining, full
  meshserve_fleet_queue_length                  requests waiting in the gateway queue
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet.policy import ReplicaView, available, load_of

_REPLICA = ("replica", "region")


class FleetMetrics:
    """The router's series; `registry` is what an exporter serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def gauge(name: str, doc: str, labels=_REPLICA) -> Gauge:
            return Gauge(f"meshserve_fleet_{name}", doc, labels, registry=self.registry)

        def counter(name: str, doc: str, labels=_REPLICA) -> Counter:
            return Counter(f"meshserve_fleet_{name}", doc, labels, registry=self.registry)

        self.up = gauge("replica_up", "1 while the router routes to the replica (healthy, not draining).")
        self.draining = gauge("replica_draining", "1 while the replica reports draining.")
        self.load = gauge("replica_load", "Load as a fraction of capacity (requests or KV pages, over weight).")
        self.slots = gauge("replica_slots", "Decode slots, from the last GetLoad.")
        self.slots_used = gauge("replica_slots_used", "Slots decoding, from the last GetLoad.")
        self.waiting = gauge("replica_waiting", "Requests in the replica's own queue, from the last GetLoad.")
        self.kv_used = gauge("replica_kv_used_ratio", "KV pages used by running requests / KV pages.")
        self.kv_cached = gauge("replica_kv_cached_ratio", "KV pages only the prefix cache holds / KV pages.")
        self.in_flight = gauge("replica_in_flight", "Requests this router sent that have not finished.")
        self.cost = gauge("replica_cost_per_hour", "Chips x price per chip-hour while the replica is up.")
        self.routed = counter("requests_routed", "Requests routed to the replica (each failover attempt counts).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the streams the replica finished.")
        self.cached_tokens = counter("cached_tokens", "Of those, tokens read from the replica's prefix cache.")
        self.ejections = counter("ejections", "Ejections of the replica.", (*_REPLICA, "reason"))
        self.failovers = counter("failovers", "Streams moved off a failing replica.", (*_REPLICA, "kind"))
        self.shed = Counter(
            "meshserve_fleet_shed", "Requests refused by the fleet.", ("reason", "region"), registry=self.registry
        )
        self.queue = Gauge("meshserve_fleet_queue_length", "Requests in the gateway queue.", registry=self.registry)

    def observe(self, view: ReplicaView) -> None:
        """Sets the replica's gauges from its view."""
        labels = (view.name, view.region)
        up = available(view)
        self.up.labels(*labels).set(1 if up else 0)
        self.draining.labels(*labels).set(1 if view.draining else 0)
        self.load.labels(*labels).set(load_of(view))
        self.slots.labels(*labels).set(view.num_slots)
        self.slots_used.labels(*labels).set(view.active_slots)
        self.waiting.labels(*labels).set(view.waiting)
        pages = max(view.kv_pages_total, 1)
        self.kv_used.labels(*labels).set(view.kv_pages_used / pages if view.kv_pages_total else 0.0)
        self.kv_cached.labels(*labels).set(view.kv_pages_cached / pages if view.kv_pages_total else 0.0)
        self.in_flight.labels(*labels).set(view.in_flight)
        self.cost.labels(*labels).set(view.chips * view.price_per_chip_hour if up else 0.0)

    def remove(self, view: ReplicaView) -> None:
        """Drops a replica's gauges (it left the config)."""
        for gauge in (
            self.up,
            self.draining,
            self.load,
            self.slots,
            self.slots_used,
            self.waiting,
            self.kv_used,
            self.kv_cached,
            self.in_flight,
            self.cost,
        ):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(view.name, view.region)
