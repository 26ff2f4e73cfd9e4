"""Benchmarks run only when asked: ``pytest benchmarks --benchmark-only`` (the default test run is ``tests/``)."""
