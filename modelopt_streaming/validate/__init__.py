"""Validate: judge any NVFP4 checkpoint from its files alone."""

from modelopt_streaming.validate.checks import Report, validate

__all__ = ["Report", "validate"]
