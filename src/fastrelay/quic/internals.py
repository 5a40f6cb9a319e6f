"""The one place that reads aioquic private state (aioquic is pinned in pyproject.toml).

tests/quic/test_internals.py exercises every function here against a real connection, so
an aioquic upgrade that moves these attributes fails loudly instead of silently.
"""

from __future__ import annotations

from aioquic.quic.connection import QuicConnection


def congestion_window(quic: QuicConnection) -> int:
    """The sender's congestion window in bytes."""
    return quic._loss.congestion_window


def send_backlog(quic: QuicConnection) -> int:
    """Bytes written to live streams and not yet acknowledged by the peer (reset and
    finished streams excluded): how far this connection's sender is behind."""
    total = 0
    for stream in quic._streams.values():
        sender = stream.sender
        if sender._reset_error_code is None and not sender.is_finished:
            total += sender._buffer_stop - sender._buffer_start
    return total
