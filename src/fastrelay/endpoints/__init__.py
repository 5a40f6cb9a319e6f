"""asyncio MoQT endpoints over QUIC: the relay server and client sessions (endpoint.py), the
publisher and subscriber behind `fastrelay publish` / `subscribe`, the relay's Prometheus metrics."""
