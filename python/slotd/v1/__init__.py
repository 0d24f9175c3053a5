"""Generated gRPC stubs for slotd.v1 (regenerate with ``python -m slotd._gen``)."""
