"""Endpoint parsing (pure logic)."""

import socket

import pytest

from fastrelay.fanout.endpoints import Endpoint, parse_endpoint


@pytest.mark.parametrize("text,ip,port,family", [
    ("10.0.0.2:5000", "10.0.0.2", 5000, socket.AF_INET),
    ("[fd00::2]:6000", "fd00::2", 6000, socket.AF_INET6),
    ("[FD00:0::2]:1", "fd00::2", 1, socket.AF_INET6),
])
def test_parse(text, ip, port, family):
    ep = parse_endpoint(text)
    assert (ep.ip, ep.port, ep.family) == (ip, port, family)
    assert parse_endpoint(str(ep)) == ep


@pytest.mark.parametrize("text,message", [
    ("10.0.0.2", "ADDRESS:PORT"),
    ("fd00::2:5000", "ADDRESS:PORT"),
    ("host.example:5000", "not an IP address"),
    ("10.0.0.2:0", "1..65535"),
    ("10.0.0.2:x", "1..65535"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_endpoint(text)


def test_default_port_for_bare_addresses():
    assert parse_endpoint("10.0.0.9", 1) == Endpoint("10.0.0.9", 1)
    assert parse_endpoint("[fd00::9]", 1) == Endpoint("fd00::9", 1)
