"""``doctor``: the serving stack checks of the seed guide's debugging section, as code."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownIssue:
    package: str
    first_bad: str  # inclusive, PEP 440 "0.16.0rc1.dev118"
    fixed_in: str | None  # exclusive; None: no fixed release known
    symptom: str
    source: str


# Data, not code: each entry says where it comes from.
KNOWN_ISSUES = (
    # The seed guide saw it in 0.16.0rc1 nightlies from dev118 on; it names no fixed build, so every later
    # 0.16.0rc1 nightly is flagged and the 0.16.0rc1 release itself is assumed to carry the fix.
    KnownIssue(
        "vllm",
        "0.16.0rc1.dev118",
        "0.16.0rc1",
        "NVFP4 checkpoints with TP > 1 fail to load: AssertionError: param_data.shape == loaded_weight.shape",
        "seed guide 'Known Issues' (regression after 0.16.0rc1.dev78; use dev78 or earlier)",
    ),
)


def _version_key(v: str) -> tuple:
    """Orders 0.16.0rc1.dev78 < 0.16.0rc1.dev118 < 0.16.0rc1 < 0.16.0 without packaging installed."""
    v = v.split("+")[0]
    m = re.match(r"(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?", v)
    if not m:
        return ((0,), 0, 0, 0, 0)
    release = tuple(int(x) for x in m.group(1).split("."))
    release += (0,) * (4 - len(release))
    pre = {"a": 0, "b": 1, "rc": 2, None: 3}[m.group(2)]
    dev = int(m.group(5)) if m.group(5) is not None else 10**9
    return (release, pre, int(m.group(3) or 0), int(m.group(4) or 0), dev)


def known_issues_for(package: str, version: str) -> list[KnownIssue]:
    k = _version_key(version)
    return [
        i
        for i in KNOWN_ISSUES
        if i.package == package
        and _version_key(i.first_bad) <= k
        and (i.fixed_in is None or k < _version_key(i.fixed_in))
    ]


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gpu_report() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if major >= 10:
            path = "native FP4 tensor cores (W4A4 NVFP4 kernels; input_scale used)"
        elif major >= 8:
            path = "no FP4 tensor cores: vLLM uses Marlin weight-only FP4 kernels (W4A16); input scales ignored"
        else:
            path = "too old for vLLM's NVFP4 kernels"
        gpus.append(
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "compute_capability": f"{major}.{minor}",
                "nvfp4_path": path,
                "native_fp4": major >= 10,
            }
        )
    return gpus


def find_cublaslt_header() -> str | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", "/usr"]
    candidates = [os.path.join(r, "include", "cublasLt.h") for r in roots if r]
    candidates += glob.glob("/usr/local/cuda-*/include/cublasLt.h")
    try:
        import nvidia

        for base in getattr(nvidia, "__path__", []):
            candidates += glob.glob(os.path.join(base, "*", "include", "cublasLt.h"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(c)), None)


def doctor(checkpoint: str | Path | None = None) -> dict:
    """What this machine's serving stack does with NVFP4: the installed vLLM against known-bad versions,
    each GPU's compute capability and FP4 path, the CUDA ``cublasLt.h`` header.

    Args:
        checkpoint: an NVFP4 checkpoint to judge for this machine too (validity, the vLLM kernel path, the
            tensor-parallel sizes that split cleanly, vLLM's disagreements with its exclude list).

    Returns:
        The report as a JSON-ready dict (``text`` renders it).

    Raises:
        CheckpointError: as ``validate``, for ``checkpoint``.
    """
    vllm = _installed_version("vllm")
    from modelopt_streaming.consumers import VLLM_VERSION

    report: dict = {
        "vllm": {
            "version": vllm,
            "known_issues": [i.__dict__ for i in known_issues_for("vllm", vllm)] if vllm else [],
            # validate judges exclusions by this vLLM release's rules (consumers/)
            "consumer_rules_of": VLLM_VERSION,
        },
        "gpus": gpu_report(),
        "cublasLt_h": find_cublaslt_header(),
    }
    if checkpoint:
        from modelopt_streaming.validate.checks import validate

        rep = validate(checkpoint, block_scales=False)
        tps = {tp: (not rep.tp_misfits(tp)) if rep.ok else None for tp in (1, 2, 4, 8)}
        native = any(g["native_fp4"] for g in report["gpus"])
        path = (
            "native FP4 (W4A4)"
            if native and rep.quant_algo == "NVFP4"
            else "native FP4 weights with bf16 activations"
            if native
            else "Marlin weight-only FP4 (input scales ignored)"
            if report["gpus"]
            else "no GPU here to serve on"
        )
        report["checkpoint"] = {
            "path": str(checkpoint),
            "valid": rep.ok,
            "quant_algo": rep.quant_algo,
            "format": rep.format,
            "vllm_path_on_this_machine": path,
            "tp_ok": tps,
            # Layers where vLLM's reading of the exclude list disagrees with the tensors (checks.py).
            "vllm_disagreements": [f.message for f in rep.findings if f.check == "consumer" and f.level == "error"],
        }
    return report


def text(report: dict) -> str:
    lines = []
    v = report["vllm"]
    if v["version"] is None:
        lines.append("vLLM: not installed here (checks of its version skipped)")
    else:
        lines.append(f"vLLM: {v['version']}")
        for issue in v["known_issues"]:
            lines.append(f"  ❌ known bad: {issue['symptom']} (source: {issue['source']})")
        if not v["known_issues"]:
            lines.append("  ✅ no known NVFP4 regression in this version")
        if v["version"].split("+")[0] != v["consumer_rules_of"]:
            lines.append(
                f"  ⚠️ validate reads exclude lists by vLLM {v['consumer_rules_of']}'s rules; this version may "
                "match layer names differently (vllm/model_executor/layers/quantization/modelopt.py)"
            )
    if not report["gpus"]:
        lines.append("GPU: none visible (NVFP4 serving needs an NVIDIA GPU: SM100/SM120 native, SM80-SM90 Marlin)")
    for g in report["gpus"]:
        lines.append(f"GPU {g['index']}: {g['name']}, compute capability {g['compute_capability']}: {g['nvfp4_path']}")
    header = report["cublasLt_h"] or "not found (without CUDA dev headers vLLM builds fail: fatal error: cublasLt.h)"
    lines.append(f"cublasLt.h: {header}")
    ck = report.get("checkpoint")
    if ck:
        lines.append(
            f"Checkpoint {ck['path']}: {'valid' if ck['valid'] else 'INVALID (run validate)'}, "
            f"{ck['format']} {ck['quant_algo']}"
        )
        lines.append(f"  vLLM path on this machine: {ck['vllm_path_on_this_machine']}")
        for message in ck["vllm_disagreements"]:
            lines.append(f"  ❌ {message}")
        tp_line = ", ".join(f"tp {k}: {'ok' if ok else 'no' if ok is False else '?'}" for k, ok in ck["tp_ok"].items())
        lines.append(f"  tensor-parallel sizes that split cleanly: {tp_line}")
    return "\n".join(lines)
