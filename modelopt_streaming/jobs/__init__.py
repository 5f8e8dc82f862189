"""Jobs: the composers. ``quantize`` (source -> plan -> codec -> sink, with the pipeline and torchrun scheduling),
``convert`` and ``decompress``; each one module, the shared machinery beside them."""
