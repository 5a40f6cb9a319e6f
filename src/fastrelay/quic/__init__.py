"""aioquic adaptations: TLS material, connection glue."""
