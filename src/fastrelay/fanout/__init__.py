"""UDP fan-out relay: one input stream copied to N subscribers, kernel or userspace data path."""
