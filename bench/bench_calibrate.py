#!/usr/bin/env python3
"""Calibrated quantize on a DeepSeek-shaped synthetic checkpoint, against the uncalibrated quantize of the same
input in the same run (and ModelOpt's own ``mtq.quantize`` max calibration where ModelOpt is installed).

    python3 bench/bench_calibrate.py --workdir /dev/shm/mscal --device cuda          # 128 x 2048 tokens, batch 8
    python3 bench/bench_calibrate.py --workdir /dev/shm/mscal --reuse --modelopt_only  # a second call: the peer

Steps, each timed run in a child process of its own (so its peak RSS and peak GPU memory are its own):
1. ``examples/synthetic_checkpoint.py`` writes the checkpoint (``--preset bench``: DeepSeek-V3's layer dims,
   2 dense + 1 MoE layer of 24 routed experts, ~5 GB) and random ``input_ids`` rows (``--calib_shape``).
2. ``modelopt_streaming.quantize`` without calibration (the baseline), then with ``calib_data`` (seconds of
   each decoder layer from the engine's ``on_layer`` callback, and each layer's peak GPU memory).
3. The two outputs compared tensor by tensor, byte for byte: only ``input_scale`` (and with ``--kv_cache fp8``
   the added ``k_scale``/``v_scale``) may differ; ``modelopt_streaming.validate`` must pass on both.
4. Unless ``--skip_modelopt``: transformers' ``from_pretrained(..., device_map=device)`` and ModelOpt's
   ``mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)`` over the same rows in the same batches; its
   input amax compared with the calibrated ``input_scale * 6 * 448`` module by module.

Prints one JSON line and writes it to ``--out`` (default ``$OUT``, else the workdir) as bench_calibrate.json
(``bench_calibrate_modelopt.json`` with ``--modelopt_only``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------- children


def _peaks(torch, device: str) -> dict:
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def child_quantize(args: argparse.Namespace) -> dict:
    """One ``modelopt_streaming.quantize`` run; with ``--calib_data`` the engine's per-layer times."""
    started = time.perf_counter()
    import logging

    import torch

    import modelopt_streaming
    from modelopt_streaming.jobs import calibration as calibration_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    imported = time.perf_counter() - started
    cuda = args.device.startswith("cuda")
    layers: list[dict] = []
    calib: dict = {}
    engine_calibrate = calibration_job.calibrate

    def timed_calibrate(index, reader, input_ids, options, kv=False, on_layer=None, **kw):
        # The engine's own entry point, as the job calls it, with a clock on each layer boundary.
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = last = time.perf_counter()

        def boundary(b, n):
            nonlocal last
            now = time.perf_counter()  # the layer's outputs were copied to the host: its work is done
            entry = {"layer": b.layers_done - 1, "boundary_s": now - last}
            if cuda:
                entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            layers.append(entry)
            last = now
            if on_layer is not None:
                on_layer(b, n)

        live = kw.get("on_live")
        if live is not None:  # the job writes a layer's units from the tensors the calibration read

            def timed_live(module_name, views, measured):
                t = time.perf_counter()
                live(module_name, views, measured)
                writes[module_name] = writes.get(module_name, 0.0) + time.perf_counter() - t

            kw["on_live"] = timed_live
        result = engine_calibrate(index, reader, input_ids, options, kv=kv, on_layer=boundary, **kw)
        calib.update(seconds=time.perf_counter() - t0, tokens=int(input_ids.numel()), rows=list(input_ids.shape))
        # Before the first layer: the model skeleton, the embedding's read and its lookup of every row.
        calib["before_first_layer_s"] = min((x["start"] for x in spans.values()), default=t0) - t0
        calib["embed_read_s"] = reads.get("model.embed_tokens")
        for x in layers:
            span = spans.get(x["layer"], {})
            x["s"] = span.get("s", x["boundary_s"])
            x["read_s"] = reads.get(f"model.layers.{x['layer']}")
            x["write_s"] = writes.get(f"model.layers.{x['layer']}", 0.0)  # quantize + write while it is live
            if x["read_s"] is not None:
                x["forward_s"] = x["s"] - x["read_s"] - x["write_s"]
        return result

    calibration_job.calibrate = timed_calibrate
    # Inside the engine: each decoder layer's whole pass (``_run_layer``) and, within it, the time to read
    # and materialize its weights on the device (``LayerStream.module``); the rest is its forwards over the
    # rows and the host copies of their outputs.
    from modelopt_streaming.engine import calibrate as engine_module
    from modelopt_streaming.engine import runner

    run_layer, module = engine_module._run_layer, runner.LayerStream.module
    spans: dict[int, dict] = {}
    reads: dict[str, float] = {}
    writes: dict[str, float] = {}

    def timed_run_layer(stream, layer_index, *a, **kw):
        t = time.perf_counter()
        run_layer(stream, layer_index, *a, **kw)
        spans[layer_index] = {"start": t, "s": time.perf_counter() - t}

    @contextlib.contextmanager
    def timed_module(self, name):
        t = time.perf_counter()
        with module(self, name) as live:
            if cuda:
                torch.cuda.synchronize()
            reads[name] = time.perf_counter() - t
            yield live

    engine_module._run_layer, runner.LayerStream.module = timed_run_layer, timed_module
    extra = {"algorithm": args.algorithm}
    if args.calib_data:
        extra.update(calib_data=args.calib_data, calib_batch_size=args.calib_batch_size)
        if args.kv_cache:
            extra["kv_cache"] = args.kv_cache
    t = time.perf_counter()
    s = modelopt_streaming.quantize(args.src, args.dst, device=args.device, progress="log", **extra)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peaks = _peaks(torch, args.device)
    if layers and cuda:  # the peak after calibration (the quantize stream) is what the last reset left
        peaks["peak_gpu_after_calibration_mb"] = peaks["peak_gpu_mb"]
        peaks["peak_gpu_mb"] = max(peaks["peak_gpu_mb"], *(x["peak_gpu_mb"] for x in layers))
    return {
        "imports_s": imported,
        "quantize_s": wall,
        "phases": s.phases,
        "input_bytes": s.input_bytes,
        "output_bytes": s.output_bytes,
        # Bytes read from the source in all: input_bytes when each tensor is read once.
        "source_bytes_read": getattr(s, "source_bytes_read", None),
        "layers": layers,
        "calibrate": calib,
        "engine": s.calibration.get("engine", {}),
        **peaks,
    }


def child_evaluate(args: argparse.Namespace) -> dict:
    """``modelopt_streaming.evaluate`` of the calibrated output against its source: seconds of each step
    (embedding, each decoder layer of both checkpoints, the logits), from the engine's own progress calls."""
    started = time.perf_counter()
    import torch

    import modelopt_streaming
    from modelopt_streaming.jobs import evaluate as evaluate_job

    imported = time.perf_counter() - started
    cuda = args.device.startswith("cuda")
    steps: list[dict] = []
    base = evaluate_job._LayerProgress

    class TimedProgress(base):  # each step is reported once its outputs reached the host
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._last = time.perf_counter()

        def step(self, what, *a, **kw):
            now = time.perf_counter()
            entry = {"step": what.split(":")[0], "s": now - self._last}
            if cuda:
                entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            steps.append(entry)
            self._last = now
            return super().step(what, *a, **kw)

    evaluate_job._LayerProgress = TimedProgress
    t = time.perf_counter()
    report = modelopt_streaming.evaluate(
        args.src, args.dst, data=args.calib_data, samples=args.eval_samples, device=args.device,
        batch_size=args.calib_batch_size, progress="log",
    )
    wall = time.perf_counter() - t
    peaks = _peaks(torch, args.device)
    if cuda and steps:
        peaks["peak_gpu_mb"] = max(peaks["peak_gpu_mb"], *(x["peak_gpu_mb"] for x in steps))
    return {
        "imports_s": imported,
        "evaluate_s": wall,
        "tokens": report.tokens,
        "tokens_per_s": report.tokens / wall,
        "steps": steps,
        "figures": {k: getattr(report, k) for k in ("kl_mean", "kl_p99", "top1_agree", "ppl", "source_ppl")},
        "layers_rel_error": report.layers,
        "act_quant": report.checkpoint.get("act_quant"),
        **peaks,
    }


def child_modelopt(args: argparse.Namespace) -> dict:
    """ModelOpt's max calibration of the same model on the same rows (the peer)."""
    started = time.perf_counter()
    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from safetensors.torch import load_file

    imported = time.perf_counter() - started
    cuda = args.device.startswith("cuda")
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16, device_map=args.device)
    model.eval()
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    ids = load_file(args.calib_data)["input_ids"]
    batch = args.calib_batch_size

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                m(input_ids=ids[i : i + batch].to(args.device), use_cache=False)

    t = time.perf_counter()
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    if cuda:
        torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t
    out = {
        "versions": {"modelopt": modelopt.__version__, "transformers": transformers.__version__},
        "imports_s": imported,
        "load_s": load_s,
        "mtq_quantize_s": quantize_s,
        "tokens": int(ids.numel()),
        "tokens_per_s": ids.numel() / quantize_s,
        "attention": getattr(model.config, "_attn_implementation", None),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        **_peaks(torch, args.device),
    }
    if args.compare_with:
        out["amax_vs_streaming"] = _compare_amax(model, Path(args.compare_with))
    return out


def _compare_amax(model, calibrated: Path) -> dict:
    """ModelOpt's input amax of each quantized ``nn.Linear`` against the calibrated output's
    ``input_scale * 6 * 448``, by module name (the checkpoint's names are the model's for these modules)."""
    import torch
    from safetensors import safe_open

    ours = {}
    for f in sorted(calibrated.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is no mapping)
                if k.endswith(".input_scale"):
                    ours[k.removesuffix(".input_scale")] = h.get_tensor(k).float().reshape(())
    rel, matched, equal, missing = [], 0, 0, []
    bound = torch.tensor(6 * 448, dtype=torch.float32)
    for name, mod in model.named_modules():
        q = getattr(mod, "input_quantizer", None)
        if not isinstance(mod, torch.nn.Linear) or q is None or getattr(q, "amax", None) is None:
            continue
        if name not in ours:
            missing.append(name)
            continue
        amax = q.amax.detach().float().max().cpu()
        # ModelOpt's export: amax / (6 * 448), a float32 division on the CPU, a multiplication by the float32
        # reciprocal on CUDA: the scale of either form counts as equal.
        forms = (amax / bound, amax * (1.0 / bound))
        equal += any(bool(f == ours[name]) for f in forms)
        rel.append(float((forms[0] - ours[name]).abs() / forms[0].abs().clamp_min(1e-30)))
        matched += 1
    return {
        "what": "nn.Linear input scales (attention, dense MLP, shared experts; fused routed experts are no Linear)",
        "modules_compared": matched,
        "input_scale_equal": equal,
        "max_rel_diff": max(rel) if rel else None,
        "modelopt_only": missing[:10],
        "modelopt_only_count": len(missing),
    }


# --------------------------------------------------------------------------------------------------- parent


def run_child(mode: str, argv: list[str], log: Path) -> dict:
    """``mode`` in a process of its own; its JSON (last stdout line) with the whole command's wall time."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *argv]
    t = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = log.read_text().splitlines()[-25:]
        print(f"{mode} failed (rc {p.returncode}):\n" + "\n".join(tail), file=sys.stderr)
        return {"error": f"rc {p.returncode}", "log_tail": tail[-8:], "command_s": wall}
    return {**json.loads(lines[-1]), "command_s": wall}


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return 8 + n, h


def tensors(root: Path) -> dict[str, tuple[Path, int, int, str, list]]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        base, h = header(f)
        for name, t in h.items():
            a, b = t["data_offsets"]
            out[name] = (f, base + a, b - a, t["dtype"], t["shape"])
    return out


def _bytes(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def compare_outputs(plain: Path, calibrated: Path, kv: bool, algorithm: str = "rtn") -> dict:
    """Every tensor of the two outputs byte for byte; only input scales (and added KV scales) may differ (and,
    under ``algorithm`` mse or gptq, the E2M1 codes ``.weight`` and block scales ``.weight_scale``)."""
    a, b = tensors(plain), tensors(calibrated)
    may_differ = (".input_scale",) if algorithm == "rtn" else (".input_scale", ".weight", ".weight_scale")
    may_add = (".k_scale", ".v_scale") if kv else ()
    differing, same_scales = [], 0
    for name in sorted(set(a) & set(b)):
        fa, oa, na, da, sa = a[name]
        fb, ob, nb, db, sb = b[name]
        equal = (da, sa, na) == (db, sb, nb)
        chunk = 1 << 26
        pos = 0
        while equal and pos < na:
            n = min(chunk, na - pos)
            equal = _bytes(fa, oa + pos, n) == _bytes(fb, ob + pos, n)
            pos += n
        if not equal:
            differing.append(name)
        elif name.endswith(may_differ):
            same_scales += 1
    only_plain, only_cal = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    bad = [n for n in differing if not n.endswith(may_differ)]
    bad_added = [n for n in only_cal if not n.endswith(may_add)]
    configs = {
        f.name: (plain / f.name).read_bytes() == f.read_bytes()
        for f in sorted(calibrated.glob("*.json"))
        if (plain / f.name).exists()
    }
    return {
        "tensors": len(a),
        "input_scales_differing": sum(n.endswith(".input_scale") for n in differing),
        "weights_differing": sum(n.endswith(".weight") for n in differing),
        "weight_scales_differing": sum(n.endswith(".weight_scale") for n in differing),
        "input_scales_equal": same_scales,
        "other_tensors_differing": bad[:20],
        "only_in_uncalibrated": only_plain[:20],
        "only_in_calibrated": len(only_cal),
        "unexpected_only_in_calibrated": bad_added[:20],
        # under mse or gptq: every other tensor (global scales, unquantized tensors) byte-identical
        "weights_and_weight_scales_byte_identical": not bad and not only_plain and not bad_added,
        "json_files_equal": configs,
    }


def layer_bytes(src: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for name, (_, _, n, _, _) in tensors(src).items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            out[int(parts[2])] = out.get(int(parts[2]), 0) + n
    return out


def summarize_layers(cal: dict, src: Path, config: dict) -> list[dict]:
    sizes = layer_bytes(src)
    dense = config.get("first_k_dense_replace", 0)
    tokens = cal.get("calibrate", {}).get("tokens", 0)
    out = []
    for x in cal.get("layers", []):
        i = x["layer"]
        out.append(
            {
                **x,
                "kind": "dense" if i < dense else "moe",
                "weight_mb": sizes.get(i, 0) / 1e6,
                "tokens_per_s": tokens / x["s"] if x["s"] else None,
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/dev/shm/mscal")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--preset", default="bench")
    p.add_argument("--routed_experts", type=int, help="override the preset's routed expert count")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--shard_size", default="1GB")
    p.add_argument("--calib_shape", default="128x2048", help="rows x tokens of the random input_ids")
    p.add_argument("--calib_batch_size", type=int, default=8)
    p.add_argument("--kv_cache", choices=["fp8"], help="also calibrate k_scale/v_scale")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--algorithm",
        default="rtn",
        choices=["rtn", "mse", "gptq"],
        help="the calibrated run's weight algorithm (mse: the data-free mse quantize is timed against rtn's too)",
    )
    p.add_argument("--reuse", action="store_true", help="keep a checkpoint and rows already in the workdir")
    p.add_argument("--skip_modelopt", action="store_true")
    p.add_argument("--modelopt_only", action="store_true", help="only the ModelOpt peer (after a run with --reuse)")
    p.add_argument("--eval_samples", type=int, default=64, help="rows that evaluate runs (0: no evaluate)")
    # internal: one child run
    p.add_argument("--child", choices=["quantize", "modelopt", "evaluate"], help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--calib_data", help=argparse.SUPPRESS)
    p.add_argument("--compare_with", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child = {"quantize": child_quantize, "modelopt": child_modelopt, "evaluate": child_evaluate}[args.child]
        result = child(args)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out) if args.out else work
    out_dir.mkdir(parents=True, exist_ok=True)
    src, rows = work / "src", work / "rows.safetensors"
    plain, cal = work / "out_uncalibrated", work / "out_calibrated"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    result: dict = {
        "bench": "calibrate",
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "preset": args.preset,
        "calib_shape": args.calib_shape,
        "calib_batch_size": args.calib_batch_size,
        "kv_cache": args.kv_cache,
        "algorithm": args.algorithm,
    }
    try:
        import torch

        result["torch"] = torch.__version__
        if args.device.startswith("cuda") and torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        result["transformers"] = None

    if not (args.reuse and (src / "config.json").exists() and rows.exists()):
        cmd = [sys.executable, str(ROOT / "examples/synthetic_checkpoint.py"), str(src), "--preset", args.preset]
        cmd += ["--device", args.device, "--shard_size", args.shard_size]
        cmd += ["--calib_tokens", str(rows), "--calib_shape", args.calib_shape]
        if args.routed_experts:
            cmd += ["--routed_experts", str(args.routed_experts)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        result["write_checkpoint_s"] = time.perf_counter() - t
    config = json.loads((src / "config.json").read_text())
    result["model"] = {
        k: config.get(k)
        for k in ("num_hidden_layers", "first_k_dense_replace", "n_routed_experts", "num_experts_per_tok")
    }
    result["input_gb"] = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    name = "bench_calibrate_modelopt.json" if args.modelopt_only else "bench_calibrate.json"

    if not args.modelopt_only:
        import shutil

        for d in (plain, cal):
            shutil.rmtree(d, ignore_errors=True)
        common = ["--src", str(src), "--device", args.device, "--calib_batch_size", str(args.calib_batch_size)]
        result["uncalibrated"] = run_child("quantize", [*common, "--dst", str(plain)], logs / "uncalibrated.log")
        if args.algorithm == "mse":  # data-free: the same stream with mse's block scale search, against rtn's
            mse_dir = work / "out_uncalibrated_mse"
            shutil.rmtree(mse_dir, ignore_errors=True)
            argv = [*common, "--dst", str(mse_dir), "--algorithm", "mse"]
            m = result["uncalibrated_mse"] = run_child("quantize", argv, logs / "uncalibrated_mse.log")
            if "error" not in m and "error" not in result["uncalibrated"]:
                m["quantize_s_ratio_to_rtn"] = m["quantize_s"] / result["uncalibrated"]["quantize_s"]
            shutil.rmtree(mse_dir, ignore_errors=True)
        extra = ["--kv_cache", args.kv_cache] if args.kv_cache else []
        extra += ["--algorithm", args.algorithm]
        c = run_child("quantize", [*common, "--dst", str(cal), "--calib_data", str(rows), *extra], logs / "cal.log")
        result["calibrated"] = c
        if "error" not in c and "error" not in result["uncalibrated"]:
            c["layers"] = summarize_layers(c, src, config)
            secs = c["calibrate"]["seconds"]
            c["calibrate"]["tokens_per_s"] = c["calibrate"]["tokens"] / secs
            by_kind: dict[str, list[dict]] = {}
            for x in c["layers"]:
                by_kind.setdefault(x["kind"], []).append(x)
            c["seconds_per_layer"] = {
                k: {
                    "mean": sum(x["s"] for x in v) / len(v),
                    "read_mean": sum(x.get("read_s") or 0 for x in v) / len(v),
                    "forward_mean": sum(x.get("forward_s") or 0 for x in v) / len(v),
                    "write_mean": sum(x.get("write_s") or 0 for x in v) / len(v),
                    "all": [x["s"] for x in v],
                }
                for k, v in by_kind.items()
            }
            base = result["uncalibrated"]
            result["overhead"] = {
                "quantize_s_uncalibrated": base["quantize_s"],
                "quantize_s_calibrated": c["quantize_s"],
                "extra_s": c["quantize_s"] - base["quantize_s"],
                "ratio": c["quantize_s"] / base["quantize_s"],
                "command_s_uncalibrated": base["command_s"],
                "command_s_calibrated": c["command_s"],
            }
            t = time.perf_counter()
            result["compare"] = compare_outputs(plain, cal, kv=bool(args.kv_cache), algorithm=args.algorithm)
            result["compare"]["seconds"] = time.perf_counter() - t
            from modelopt_streaming.validate import validate

            t = time.perf_counter()
            result["validate"] = {"uncalibrated": validate(plain).ok, "calibrated": validate(cal).ok}
            result["validate"]["seconds"] = time.perf_counter() - t
            if args.eval_samples:  # the calibrated (W4A4) output against its source, the same rows' first ones
                argv = [*common, "--dst", str(cal), "--calib_data", str(rows), "--eval_samples", str(args.eval_samples)]
                e = run_child("evaluate", argv, logs / "evaluate.log")
                result["evaluate"] = e
                if "steps" in e:
                    lay = [x for x in e["steps"] if x["step"].startswith("layer")]
                    e["seconds_per_layer"] = [x["s"] for x in lay]

    if not args.skip_modelopt:
        import importlib.util

        if importlib.util.find_spec("modelopt") is None:
            result["modelopt"] = {"skipped": "nvidia-modelopt is not installed here"}
        else:
            argv = ["--src", str(src), "--device", args.device, "--calib_data", str(rows)]
            argv += ["--calib_batch_size", str(args.calib_batch_size)]
            if (cal / "model.safetensors.index.json").exists() or list(cal.glob("*.safetensors")):
                argv += ["--compare_with", str(cal)]
            result["modelopt"] = run_child("modelopt", argv, logs / "modelopt.log")
    result["total_s"] = time.perf_counter() - started
    line = json.dumps(result)
    print(line)
    (out_dir / name).write_text(line + "\n")
    for f in logs.glob("*.log"):  # the children's logs come back too
        if args.out:
            (out_dir / f.name).write_text(f.read_text()[-200_000:])


if __name__ == "__main__":
    main()
