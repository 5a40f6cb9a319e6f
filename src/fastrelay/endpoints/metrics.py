"""Prometheus metrics of a MoQT relay, read from the relay's state at scrape time (no cost
per object), and of the sockets serve_relay() opened for it: what they ignored, and what the
kernel dropped before they could read it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..moq.relay import Relay
from ..quic.link import udp_socket_drops
from .endpoint import servers_of

if TYPE_CHECKING:
    from ..datapath.kernel.path import KernelDatapath


class RelayCollector(Collector):
    """Exposes sessions, tracks, subscribers, objects/bytes in and out, cache hits and drops, and
    what the relay's QUIC sockets ignored or lost."""

    def __init__(self, relay: Relay, kernel: KernelDatapath | None = None) -> None:
        self.relay = relay
        self.kernel = kernel

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
        yield CounterMetricFamily("fastrelay_moq_fast_objects", "objects the kernel data path delivered",
                                  value=st.fast_objects)
        yield from self._endpoint()
        if self.kernel is None:
            return
        counters = self.kernel.fp.counters()
        kernel = CounterMetricFamily("fastrelay_moq_kernel_packets", "packets by kernel counter", labels=["counter"])
        for name, value in counters.items():
            kernel.add_metric([name], value)
        yield kernel
        path = CounterMetricFamily("fastrelay_moq_kernel_path_events",
                                   "the relay's side of the kernel path: registrations, absorbed ACKs, repairs, resets",
                                   labels=["event"])
        for name, value in vars(self.kernel.stats).items():
            if name != "connections":
                path.add_metric([name], value)
        yield path
        yield GaugeMetricFamily("fastrelay_moq_kernel_path_connections", "subscriber connections on the kernel path",
                                value=self.kernel.stats.connections)
        per_sub = self.kernel.per_subscriber()
        for metric, help_text, index in (
                ("fastrelay_moq_subscriber_kernel_packets", "packets the kernel sent to a subscriber", 0),
                ("fastrelay_moq_subscriber_kernel_bytes", "UDP payload bytes the kernel sent to a subscriber", 1),
                ("fastrelay_moq_subscriber_user_packets", "packets userspace sent to a kernel-path subscriber", 2),
                ("fastrelay_moq_subscriber_user_bytes", "UDP payload bytes userspace sent to a kernel-path subscriber",
                 3)):
            family = CounterMetricFamily(metric, help_text, labels=["subscriber"])
            for addr, values in per_sub.items():
                family.add_metric([addr], values[index])
            yield family

    def _endpoint(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        servers = servers_of(self.relay)
        ignored = CounterMetricFamily("fastrelay_quic_datagrams_ignored",
                                      "datagrams no QUIC connection took (junk, unknown connection, limits), by reason",
                                      labels=["reason"])
        for reason, n in sorted(sum((s.stats.ignored for s in servers), Counter()).items()):
            ignored.add_metric([reason], n)
        yield ignored
        yield CounterMetricFamily("fastrelay_quic_retries_sent", "Retry packets sent (address validation)",
                                  value=sum(s.stats.retries for s in servers))
        yield CounterMetricFamily("fastrelay_quic_version_negotiations_sent", "Version Negotiation packets sent",
                                  value=sum(s.stats.version_negotiations for s in servers))
        yield GaugeMetricFamily("fastrelay_quic_half_open", "QUIC connections whose handshake has not completed",
                                value=sum(len(s.half_open) for s in servers))
        yield CounterMetricFamily("fastrelay_moq_dropped_writes",
                                  "stream writes dropped: the peer stopped the stream (STOP_SENDING) or it was reset",
                                  value=sum(s.stats.dropped_writes for s in servers))
        live = [s for s in servers if not s.transport.is_closing()]
        yield CounterMetricFamily("fastrelay_udp_receive_drops",
                                  "datagrams the kernel dropped at the relay's UDP socket (receive buffer full)",
                                  value=sum(udp_socket_drops(s.socket) or 0 for s in live))
        yield GaugeMetricFamily("fastrelay_udp_receive_buffer_bytes", "receive buffer of the relay's UDP socket",
                                value=sum(s.buffers.receive for s in live))
