"""Python side of fastrelay's BPF programs: build, load, maps, ring buffers, attach."""
