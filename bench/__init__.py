"""Benchmarks (`make bench`, `make load`): figures beside their baselines, measured on the embedded stack."""
