"""layerroute: per-step transformer block skipping for agentic language models."""

__version__ = "0.1.0"
