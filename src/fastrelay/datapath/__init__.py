"""The MoQT relay's data paths: what sends a subgroup to a subscriber besides the relay core.

`interface` is the one interface the relay core (moq/relay.py) calls; `kernel/` is the kernel
data path (bpf/moq_fastpath.bpf.c and its QUIC side). The userspace path is no class: a relay
without a data path (`datapath=None`) sends every object itself through aioquic.

This package's own modules import nothing heavy (no kernel/, aioquic or asyncio): the sans-I/O
relay core imports `interface`.
"""
