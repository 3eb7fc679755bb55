"""Benchmarks that ship with the engine: ``netid bench accuracy`` and ``netid calibrate``."""
