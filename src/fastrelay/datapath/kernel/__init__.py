"""The kernel data path: bpf/moq_fastpath.bpf.c's maps and records (maps.py), the QUIC side that
keeps every connection right around it (path.py), the in-kernel loss recovery (recovery.py)."""
