"""Network-namespace testbeds for exercising the relay on one machine."""
