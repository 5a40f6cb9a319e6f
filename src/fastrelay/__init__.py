"""fastrelay: a media relay with a Python control plane and an eBPF data plane."""

__version__ = "0.1.0"
