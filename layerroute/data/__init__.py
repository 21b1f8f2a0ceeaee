"""Agentic step data: sources, step segmentation, splits."""
