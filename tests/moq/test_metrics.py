"""Prometheus exposition of relay state (in-memory sessions)."""

from prometheus_client import CollectorRegistry, generate_latest

from fastrelay.moq import messages as m
from fastrelay.moq.metrics import RelayCollector
from fastrelay.moq.params import Version
from fastrelay.moq.relay import Relay

from .test_relay import NS, TRACK, Publisher, connect


def test_metrics_follow_the_relay():
    relay = Relay()
    reg = CollectorRegistry()
    reg.register(RelayCollector(relay))
    pub = Publisher(relay, Version.DRAFT_16)
    for i in range(2):
        s, _ = connect(relay, Version.DRAFT_16, f"s{i}")
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for o in range(3):
        pub.write(0, o)
    text = generate_latest(reg).decode()
    for line in ("fastrelay_moq_sessions 3.0", "fastrelay_moq_tracks 1.0", "fastrelay_moq_subscribers 2.0",
                 "fastrelay_moq_objects_in_total 3.0", "fastrelay_moq_objects_out_total 6.0",
                 "fastrelay_moq_sessions_accepted_total 3.0"):
        assert line in text, line
