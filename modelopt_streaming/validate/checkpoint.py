"""An NVFP4 checkpoint as validation sees it: headers, configs and one view per module.

Knows the two formats (ModelOpt: ``weight``/``weight_scale``/``weight_scale_2``/``input_scale``;
compressed-tensors ``nvfp4-pack-quantized``: ``weight_packed``/``weight_scale``/``weight_global_scale``/
``input_global_scale``, global scales stored as reciprocals) and nothing of how the checkpoint was made,
so it judges ours, NVIDIA's and llm-compressor's alike. Problems are collected, never raised, so one
broken shard does not hide the rest of the report.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelopt_streaming.errors import CheckpointError
from modelopt_streaming.formats.interchange import COMPRESSED_TENSORS, EXPERTS_3D_SUFFIXES, LEAVES, MODELOPT
from modelopt_streaming.source.index import INDEX_FILE, TensorInfo, shard_tensors
from modelopt_streaming.source.reader import TensorReader

# ModuleView attribute of each role of a 3-D experts tensor's scales.
_EXPERTS_3D_ROLES = (("weight_scale", "weight_scale"), ("global", "global_scale"), ("input", "input_scale"))
_FUSED_EXPERTS = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)$")
_SUFFIXES = LEAVES

QUANT_SUFFIXES = (
    "weight_scale",
    "weight_scale_2",
    "input_scale",
    "weight_global_scale",
    "input_global_scale",
    "weight_packed",
    "weight_shape",
    "weight_zero_point",
)


@dataclass
class Finding:
    level: str  # "error" or "warning"
    check: str
    message: str

    def as_dict(self) -> dict:
        return {"level": self.level, "check": self.check, "message": self.message}


@dataclass
class ModuleView:
    name: str
    weight: TensorInfo | None = None  # packed uint8 when quantized, else the source-precision weight
    weight_scale: TensorInfo | None = None
    global_scale: TensorInfo | None = None
    input_scale: TensorInfo | None = None
    extra: list[TensorInfo] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.weight is not None and self.weight.dtype == "U8"

    @property
    def experts_3d(self) -> bool:
        return self.weight is not None and len(self.weight.shape) == 3 and bool(_FUSED_EXPERTS.search(self.name))

    @property
    def in_features(self) -> int | None:
        if self.weight is None or len(self.weight.shape) != 2:
            return None
        return self.weight.shape[1] * (2 if self.quantized else 1)


class NVFP4Checkpoint:
    """Headers and configs of a checkpoint directory, read leniently."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.findings: list[Finding] = []
        self.config = self._json("config.json")
        self.hf_quant_config = self._json("hf_quant_config.json")
        self.format = self._detect_format()
        self.tensors: dict[str, TensorInfo] = {}
        self.weight_map: dict[str, str] | None = None
        self.index_total_size: int | None = None
        self._read_headers()
        self.modules = self._module_views()
        self._reader = TensorReader(self.root)

    # -- loading -----------------------------------------------------------------------------------
    def error(self, check: str, message: str) -> None:
        self.findings.append(Finding("error", check, message))

    def warning(self, check: str, message: str) -> None:
        self.findings.append(Finding("warning", check, message))

    def _json(self, name: str) -> dict | None:
        path = self.root / name
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.error("config", f"{path}: not valid JSON ({e})")
            return None
        return data if isinstance(data, dict) else None

    @property
    def quant_config(self) -> dict:
        qc = (self.config or {}).get("quantization_config")
        return qc if isinstance(qc, dict) else {}

    def _detect_format(self) -> str | None:
        if self.hf_quant_config is not None:
            return MODELOPT
        method = self.quant_config.get("quant_method")
        if method == "modelopt":
            return MODELOPT
        if method == "compressed-tensors":
            return COMPRESSED_TENSORS
        self.error(
            "format",
            f"{self.root}: no hf_quant_config.json and no ModelOpt or compressed-tensors "
            "quantization_config in config.json: not an NVFP4 checkpoint",
        )
        return None

    def _read_headers(self) -> None:
        index_path = self.root / INDEX_FILE
        files = sorted(p.name for p in self.root.glob("*.safetensors"))
        if index_path.exists():
            data = self._json(INDEX_FILE) or {}
            wm = data.get("weight_map")
            if isinstance(wm, dict):
                self.weight_map = wm
                listed = set(wm.values())
                for f in sorted(listed - set(files)):
                    self.error("index", f"{index_path}: names shard {f!r}, which does not exist")
            total = (data.get("metadata") or {}).get("total_size")
            self.index_total_size = total if isinstance(total, int) else None
        elif len(files) > 1:
            self.error("index", f"{self.root}: {len(files)} shards but no {INDEX_FILE}")
        for rel in files:
            try:
                shard = shard_tensors(self.root, rel)
            except CheckpointError as e:
                self.error("shards", str(e))
                continue
            for name, info in shard.items():
                if name in self.tensors:
                    self.error("shards", f"{self.root / rel}: tensor {name!r} also in {self.tensors[name].file}")
                    continue
                self.tensors[name] = info

    def _module_views(self) -> dict[str, ModuleView]:
        views: dict[str, ModuleView] = {}
        # 3-D fused experts (GPT-OSS, Llama-4) are named by their tensor; ModelOpt 0.47 appends its scale
        # names to it (``X_weight_scale``, ``X_weight_scale_2``, ``X_input_scale``).
        taken: set[str] = set()
        for name, info in self.tensors.items():
            if _FUSED_EXPERTS.search(name) and len(info.shape) == 3:
                view = views[name] = ModuleView(name, weight=info)
                for role, attr in (
                    ("weight_scale", "weight_scale"),
                    ("global", "global_scale"),
                    ("input", "input_scale"),
                ):
                    setattr(view, attr, self.tensors.get(name + EXPERTS_3D_SUFFIXES[role]))
                taken |= {name, *(name + s for s in EXPERTS_3D_SUFFIXES.values())}
        suffix = _SUFFIXES.get(self.format or MODELOPT)
        roles = {
            suffix["weight"]: "weight",
            suffix["weight_scale"]: "weight_scale",
            suffix["global"]: "global_scale",
            suffix["input"]: "input_scale",
        }
        for name, info in self.tensors.items():
            module, _, leaf = name.rpartition(".")
            if not module or name in taken:
                continue
            role = roles.get(leaf)
            if role is None and leaf == "weight":
                role = "weight"  # an unquantized module in a compressed-tensors checkpoint
            if role is None:
                if leaf in QUANT_SUFFIXES:
                    views.setdefault(module, ModuleView(module)).extra.append(info)
                continue
            view = views.setdefault(module, ModuleView(module))
            if getattr(view, role) is not None:
                view.extra.append(info)
            else:
                setattr(view, role, info)
        return views

    # -- reading values -----------------------------------------------------------------------------
    def read(self, info: TensorInfo) -> torch.Tensor:
        return self._reader.read(info)

    def weight_scale_2(self, view: ModuleView) -> float | None:
        """The ModelOpt-convention global scale (compressed-tensors stores its reciprocal)."""
        if view.global_scale is None or view.global_scale.numel != 1:
            return None
        value = float(self.read(view.global_scale).float().reshape(()))
        if self.format == COMPRESSED_TENSORS:
            return 1.0 / value if value else math.inf
        return value

    def scalar_bits(self, info: TensorInfo | None) -> bytes | None:
        if info is None:
            return None
        return self.read(info).reshape(-1).view(torch.uint8).numpy().tobytes()

    def close(self) -> None:
        self._reader.close()
