"""Consumers: what a serving engine builds from a checkpoint and how it matches exclusions against those layers."""
