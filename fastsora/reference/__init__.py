"""Plain-PyTorch reference of each op: the CPU backend and the test oracle (run in float64 for tests)."""
