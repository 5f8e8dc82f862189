"""Validate: judge any NVFP4 checkpoint from its files alone."""

from .checks import Report, validate

__all__ = ["Report", "validate"]
