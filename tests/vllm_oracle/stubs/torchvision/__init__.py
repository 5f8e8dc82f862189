"""A stand-in for torchvision, on the path of the vLLM oracle process for Llama-4 only.

The vLLM environment has no torchvision (the build pip brings needs CUDA libraries; the Makefile removes
it), but vLLM's Llama4ForConditionalGeneration module imports transformers' Llama-4 image processor, which
imports torchvision at module level. Building the model on the meta device never runs an image transform,
so every ``torchvision.*`` module and attribute here exists and does nothing; no quantization decision
depends on it.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"


class _Anything(type):
    def __getattr__(cls, name):
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        return cls


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
