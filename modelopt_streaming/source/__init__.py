"""Source: reading a checkpoint. The index (headers only), the vendor encodings decoded on the fly (DeepSeek FP8
blocks, Kimi INT4 packs, GPT-OSS MXFP4), the reader that moves bytes, and the Hugging Face cache lookup."""
