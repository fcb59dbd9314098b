"""Funnel: benchmarks."""
