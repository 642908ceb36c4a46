"""Agent health on the host: heartbeat policies and per-VM agent state (pure)."""
