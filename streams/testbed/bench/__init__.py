"""Benchmarks (test bed): `streambill bench <scenario>` starts what a scenario needs,
prints its figures and writes them as JSON. One module per scenario, each with a
``run``; what they share is in ``harness`` (environment, waits, measurement, the
aggregate of several runs) and ``inputs`` (the encoded records)."""
