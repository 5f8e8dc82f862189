"""Formats: the NVFP4 constants and the two dialects' names (ModelOpt, compressed-tensors). Pure data and scalar math;
no files, no tensors read."""
