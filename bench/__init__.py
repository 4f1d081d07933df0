"""Benchmarks of flask-mmolove against baselines measured in the same run (make bench)."""
