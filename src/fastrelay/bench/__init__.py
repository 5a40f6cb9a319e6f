"""Benchmarks: kernel and userspace data paths measured side by side in one run."""
