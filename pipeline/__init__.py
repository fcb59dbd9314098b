"""Funnel: pipeline."""
