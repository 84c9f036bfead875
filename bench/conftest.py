"""pytest-benchmark suites (run explicitly: `pytest bench/`; never part of tests/)."""
