"""Benchmarks and the measurement tools they use (not part of the library users import)."""
