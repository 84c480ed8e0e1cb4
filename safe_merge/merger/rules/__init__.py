"""Refusals before any work, one concern per module; merger/preflight.py runs them in order."""
