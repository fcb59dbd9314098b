"""Funnel: training."""
