"""Benchmarks (printed tables); run each module as a script, e.g. ``python bench/fake_quant.py``."""
