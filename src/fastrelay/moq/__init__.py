"""Media over QUIC Transport (MoQT): sans-I/O wire codec, session state machine, relay core."""
