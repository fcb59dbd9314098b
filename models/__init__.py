"""Funnel: models."""
