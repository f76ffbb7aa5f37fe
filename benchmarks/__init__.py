"""Benchmarks of replica-router: ``python -m benchmarks [--quick] [--only NAME] [--out DIR]``."""
