"""Plan: a pure function of the index and the recipe: which tensors are quantized, the fused groups, the shards."""
