"""The interface between the sans-I/O relay core (moq/relay.py) and a data path.

It imports nothing beyond the standard library at run time: the relay core imports it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..moq.relay import Downstream, Peer, Track


class Owner(enum.Enum):
    """Who delivers one upstream stream (or a track's datagrams) to one subscription."""

    DATAPATH = "datapath"  # the data path sends it: the relay core only counts its objects
    DROPPED = "dropped"  # the data path dropped it whole under congestion: the relay core skips it too
    RELAY = "relay"  # the relay core sends it (queued, through aioquic)


class Datapath(Protocol):
    """A data path that delivers some subgroups itself (datapath/kernel/path.py). The relay core
    tells it about tracks and subscriptions and asks, per subscriber and upstream stream, who
    sends the stream (`owns()`). A relay with no data path (`datapath=None`) is on the userspace
    path: the relay core sends every object through aioquic."""

    def upstream_track(self, peer: Peer, alias: int, track: Track, default_priority: int) -> None: ...
    def downstream_ready(self, ds: Downstream) -> None: ...
    def downstream_gone(self, ds: Downstream) -> None: ...
    def peer_gone(self, peer: Peer) -> None: ...
    def stream_ended(self, peer: Peer, stream_id: int, reset: bool) -> None: ...
    def owns(self, ds: Downstream, peer: Peer, stream_id: int) -> Owner: ...
    def owns_datagrams(self, ds: Downstream) -> bool: ...
