"""Ready-made loops that string the library's parts together (the demos and benchmarks use them)."""
