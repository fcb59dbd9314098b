"""Funnel: tune."""
