"""Prometheus metrics of a MoQT relay, read from the relay's state at scrape time (no cost
per object)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .relay import Relay


class RelayCollector(Collector):
    """Exposes sessions, tracks, subscribers, objects/bytes in and out, cache hits and drops."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r, st = self.relay, self.relay.stats
        tracks = list(r.tracks.values())
        yield GaugeMetricFamily("fastrelay_moq_sessions", "MoQT sessions connected now", value=len(r.peers))
        yield CounterMetricFamily("fastrelay_moq_sessions_accepted", "MoQT sessions accepted", value=st.sessions)
        yield GaugeMetricFamily("fastrelay_moq_tracks", "tracks with a publisher", value=len(tracks))
        yield GaugeMetricFamily("fastrelay_moq_subscribers", "subscriptions being served",
                                value=sum(len(t.subscribers) for t in tracks))
        yield CounterMetricFamily("fastrelay_moq_objects_in", "objects received from publishers",
                                  value=st.objects_in)
        yield CounterMetricFamily("fastrelay_moq_objects_out", "objects sent to subscribers", value=st.objects_out)
        yield CounterMetricFamily("fastrelay_moq_bytes_in", "payload bytes received", value=st.bytes_in)
        yield CounterMetricFamily("fastrelay_moq_bytes_out", "payload bytes sent", value=st.bytes_out)
        yield CounterMetricFamily("fastrelay_moq_cache_hits", "objects served from the cache", value=st.cache_hits)
        yield CounterMetricFamily("fastrelay_moq_dropped_objects", "objects not sent to slow subscribers",
                                  value=st.dropped_objects)
        yield GaugeMetricFamily("fastrelay_moq_cache_bytes", "bytes held in track caches",
                                value=sum(t.cache.bytes for t in tracks))
