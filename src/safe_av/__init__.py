"""SAFE: teach a frozen vision-language model to take audio without forgetting."""

__version__ = "0.1.0"
