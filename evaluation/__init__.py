"""Offline tools around the proxy: the evaluation harness, the demo build, and the proxy-process harness
shared by the tests and the benchmarks (`evaluation.testing`)."""
