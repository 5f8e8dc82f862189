"""Builds the optional fused CPU codec (plain C, no torch headers); without a compiler the package still
installs and uses the torch reference codec. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "modelopt_streaming.codec._nvfp4_cpu",
            sources=["modelopt_streaming/codec/_nvfp4_cpu.c"],
            # IEEE division and NaN rules are part of the byte contract: never -ffast-math; and no FMA contraction
            # (the mse search's errors must round as the torch reference's separate multiplies and adds).
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off", "-std=c11"],
            optional=True,
        )
    ]
)
