"""Funnel: serving."""
