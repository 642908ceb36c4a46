"""Test-wide settings."""

from hypothesis import settings

# Speed lives in benchmarks (bench/), not in tests: a per-example deadline only fails on a shared, busy machine.
settings.register_profile("hyperfence", deadline=None)
settings.load_profile("hyperfence")
