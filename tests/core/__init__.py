"""Table tests for the sans-IO decision cores in microproxy/core (no event loop, fake clock)."""
