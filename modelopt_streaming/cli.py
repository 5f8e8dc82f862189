"""Command line: parses arguments and calls the Python API; nothing else."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import traceback
from collections.abc import Iterator

from modelopt_streaming.errors import (
    CheckpointError,
    ConsumerError,
    ConversionRefused,
    ModeloptStreamingError,
    OutputError,
    OutputStateError,
    UsageError,
)

# The logger every job writes its messages to (each module a child of it).
LOGGER = "modelopt_streaming"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 (decimal units, as Hugging Face uses them), '512MiB' -> binary, plain bytes too."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[unit])


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Every option answers to both spellings: --input_dir and --input-dir."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelopt-streaming", description="Stream safetensors checkpoints into NVFP4.")
    from modelopt_streaming.version import __version__

    parser.add_argument("--version", action="version", version=f"modelopt-streaming {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a safetensors checkpoint to NVFP4, streaming")
    _add(q, "input_dir", required=True, help="source Hugging Face checkpoint directory (bf16/fp16/fp32)")
    _add(q, "output_dir", help="where to write the NVFP4 checkpoint (required unless --dry_run)")
    scope = q.add_mutually_exclusive_group()
    _add(scope, "mlp_only", action="store_true", help="quantize dense MLPs, shared and routed experts only")
    _add(scope, "experts_only", action="store_true", help="quantize routed experts only")
    _add(
        q,
        "exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave modules matching this fnmatch pattern unquantized (repeatable)",
    )
    _add(
        q,
        "exclude_config",
        metavar="PATH",
        help="reuse the exclude_modules/ignore list of a reference hf_quant_config.json or config.json",
    )
    _add(q, "weight_only", action="store_true", help="W4A16_NVFP4: no input_scale tensors")
    _add(
        q,
        "scale_math",
        choices=["cuda", "cpu"],
        default="cuda",
        help="weight_scale_2 as ModelOpt computes it on CUDA (amax * fp32(1/2688), default) or on CPU (amax / 2688)",
    )
    _add(
        q,
        "algorithm",
        choices=["rtn", "mse", "gptq"],
        default="rtn",
        help="block scales: rtn (default) rounds each to the nearest E4M3 value, ModelOpt's bytes; mse tries the "
        "neighbours on the E4M3 grid too and keeps the smallest squared error (never worse per block, data-free); "
        "gptq (needs --calib_data) keeps rtn's scales and chooses the codes against each Linear's calibration "
        "inputs, layer by layer (docs/gptq.md)",
    )
    _add(q, "device", default=None, help="cpu, cuda or cuda:N (default: cuda when available); bytes are identical")
    _add(q, "max_shard_size", type=parse_size, default=5 * 10**9, help="largest output shard (default 5GB)")
    _add(
        q,
        "io_threads",
        type=int,
        default=None,
        help="reader threads and writer threads per process (default: 2-8 from the CPUs per torchrun process); "
        "more helps RAID, tmpfs and parallel file systems, bytes are identical",
    )
    _add(q, "dry_run", action="store_true", help="print the plan, write nothing")
    _add(
        q,
        "overwrite",
        action="store_true",
        help="replace an earlier output of this tool (refused if the directory holds files it did not write)",
    )
    _add(q, "resume", action="store_true", help="continue an interrupted run in the same output directory")
    _add(q, "verify", action="store_true", help="with --resume, check finished shards by sha256 (not only size)")
    _add(q, "allow_nonfinite", action="store_true", help="quantize weights that hold NaN/Inf instead of refusing")
    _add(q, "quiet", action="store_true", help="no progress output")
    _add(q, "debug", action="store_true", help="show tracebacks on errors")
    _add(
        q,
        "format",
        choices=["modelopt", "compressed-tensors"],
        default="modelopt",
        help="output dialect: ModelOpt (default) or compressed-tensors nvfp4-pack-quantized (same codes)",
    )
    _add(
        q,
        "input_scales_from",
        metavar="CKPT",
        help="take each module's input_scale from this NVFP4 checkpoint of the same model (either dialect)",
    )
    _add(
        q,
        "calib_data",
        metavar="SRC",
        help="calibrate every input_scale on this data (safetensors input_ids [N, L], JSON Lines, or text): the "
        "source model runs one decoder layer at a time, as ModelOpt's max calibration computes them",
    )
    _add(q, "calib_size", type=int, metavar="N", help="calibration rows to use (default: all the data gives)")
    _add(q, "calib_seq_len", type=int, metavar="L", help="tokens per row for text data (default 2048)")
    _add(q, "calib_batch_size", type=int, default=1, metavar="B", help="calibration rows per forward (default 1)")
    _add(q, "trust_remote_code", action="store_true", help="run the checkpoint's custom tokenizer code")
    _add(
        q,
        "calib_device_budget",
        type=parse_size,
        metavar="SIZE",
        help="device memory one decoder layer may take in calibration; a larger layer keeps its experts in host "
        "memory, one at a time on the device (default: the GPU's free memory less 10 GiB)",
    )
    _add(
        q,
        "calib_host_budget",
        type=parse_size,
        metavar="SIZE",
        help="host memory for the hidden states of each of the calibration's two layer boundaries, a memory-mapped "
        "file in the temp directory beyond (default: a quarter of this process's memory shared by the two, "
        "at least 4 GiB each)",
    )
    _add(
        q,
        "calib_dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="the dtype the model runs in for calibration (default bfloat16; float32 runs a float32 checkpoint as "
        "stored, which --algorithm gptq needs for one)",
    )
    _add(
        q,
        "gptq_scales",
        choices=["mse", "rtn"],
        help="gptq: the block scales fixed before its loop, mse's search (default) or rtn's",
    )
    _add(
        q,
        "gptq_natural_order",
        action="store_true",
        help="gptq: quantize the columns in their order (default: act order, by decreasing Hessian diagonal)",
    )
    _add(q, "gptq_damp", type=float, metavar="F", help="gptq: damping, a share of the Hessian's mean diagonal (0.01)")
    _add(q, "gptq_block_size", type=int, metavar="N", help="gptq: columns per lazy-update block (128)")
    _add(
        q,
        "gptq_min_expert_tokens",
        type=int,
        metavar="N",
        help="gptq: a routed expert with fewer calibration tokens is encoded by mse instead (64)",
    )
    _add(
        q,
        "gptq_not_sequential",
        action="store_true",
        help="gptq: every layer's inputs from the unquantized model (default: from the already quantized layers)",
    )
    _add(
        q,
        "kv_cache",
        choices=["fp8", "fp8_cast"],
        help="FP8 KV cache: fp8 writes calibrated k_scale/v_scale per attention layer (needs --calib_data); "
        "fp8_cast only the config entries (vLLM then uses scale 1.0)",
    )
    _add(q, "json", action="store_true", help="print the summary and the plan as JSON")

    c = sub.add_parser("convert", help="convert an NVFP4 checkpoint between ModelOpt and compressed-tensors")
    c.add_argument("input_dir")
    c.add_argument("output_dir")
    _add(c, "to", choices=["modelopt", "compressed-tensors"], required=True, help="the target dialect")
    _add(c, "force", action="store_true", help="convert fused groups whose members carry different scales unchanged")
    dc = sub.add_parser("decompress", help="dequantize NVFP4, block FP8 or INT4 weights to plain safetensors")
    dc.add_argument("input_dir")
    dc.add_argument("output_dir")
    _add(dc, "dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the dequantized weights")
    _add(dc, "max_shard_size", type=parse_size, default=5 * 10**9, help="largest output shard (default 5GB)")
    for sp in (c, dc):
        _add(sp, "overwrite", action="store_true", help="replace a previous output of this tool")
        _add(sp, "resume", action="store_true", help="continue an interrupted run in the same output directory")
        _add(sp, "verify", action="store_true", help="with --resume, check finished shards by sha256")
        _add(sp, "json", action="store_true", help="machine-readable summary")
        _add(sp, "debug", action="store_true", help="show tracebacks on errors")
    v = sub.add_parser("validate", help="check an NVFP4 checkpoint (ModelOpt or compressed-tensors format)")
    v.add_argument("checkpoint")
    _add(v, "tp", type=int, help="also check that row-parallel input dims split into multiples of 16 at this TP")
    _add(v, "skip_block_scales", action="store_true", help="do not read the fp8 block scales (faster)")
    _add(v, "json", action="store_true", help="machine-readable report")

    s = sub.add_parser("compare-scales", help="distributions of global, block and input scales, by module kind")
    s.add_argument("a")
    s.add_argument("b", nargs="?")
    _add(s, "plot", metavar="FILE.png", help="write histograms")
    _add(s, "skip_block_scales", action="store_true", help="do not read the fp8 block scales (faster)")
    _add(s, "json", action="store_true")

    w = sub.add_parser("compare-weights", help="byte-level comparison of two NVFP4 checkpoints")
    w.add_argument("a")
    w.add_argument("b")
    _add(w, "tensor", metavar="PATTERN", help="only modules matching this fnmatch pattern")
    _add(w, "source", metavar="BF16_DIR", help="source checkpoint: report each one's quantization error")
    _add(w, "json", action="store_true")

    e = sub.add_parser("evaluate", help="what NVFP4 did to the model's outputs: KL, top-1, perplexity, per layer")
    _add(e, "source", required=True, metavar="IN", help="the unquantized source checkpoint")
    _add(e, "checkpoint", required=True, metavar="Q", help="its NVFP4 checkpoint (either dialect, any producer)")
    _add(e, "data", metavar="SRC", help="what --calib_data takes (default: the evaluation text shipped with the tool)")
    _add(e, "samples", type=int, metavar="N", help="rows to evaluate (default: all the data gives)")
    _add(e, "seq_len", type=int, metavar="L", help="tokens per row for text data (default 2048)")
    _add(e, "batch_size", type=int, default=1, metavar="B", help="rows per forward (default 1)")
    _add(
        e,
        "act_quant",
        choices=["auto", "on", "off"],
        default="auto",
        help="quantize-dequantize the inputs of quantized Linears (W4A4); auto follows the checkpoint's config",
    )
    _add(
        e,
        "dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype: the source's (bfloat16) or float32 (only the quantization's error is measured)",
    )
    _add(e, "device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    _add(
        e,
        "host_budget",
        type=parse_size,
        metavar="SIZE",
        help="host memory for each of the four hidden-state stores (two streams, a layer's input and output), a "
        "memory-mapped file in the temp directory beyond (default: a quarter of this process's memory shared by "
        "the four, at least 4 GiB each)",
    )
    _add(e, "plot", metavar="FILE.png", help="write the per-layer relative error curve")
    _add(e, "trust_remote_code", action="store_true", help="run the checkpoint's custom tokenizer code")
    _add(e, "quiet", action="store_true", help="no progress output")
    _add(e, "json", action="store_true", help="machine-readable report")
    _add(e, "debug", action="store_true", help="show tracebacks on errors")

    d = sub.add_parser("doctor", help="check the serving stack (vLLM version, GPU, CUDA headers)")
    d.add_argument("checkpoint", nargs="?")
    _add(d, "json", action="store_true")
    return parser


def _run_validation(args) -> int:
    import json

    from modelopt_streaming.validate import checks, doctor, scales, weights

    if args.command == "validate":
        report = checks.validate(args.checkpoint, tp=args.tp, block_scales=not args.skip_block_scales)
        print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
        return 0 if report.ok else 1
    if args.command == "compare-scales":
        a = scales.collect(args.a, block_scales=not args.skip_block_scales)
        b = scales.collect(args.b, block_scales=not args.skip_block_scales) if args.b else None
        result = scales.compare(a, b)
        if args.plot:
            scales.plot(a, b, args.plot)
            result["plot"] = args.plot
        print(json.dumps(result, indent=2) if args.json else scales.text(result))
        return 0
    if args.command == "compare-weights":
        r = weights.compare_weights(args.a, args.b, tensor=args.tensor, source=args.source)
        print(json.dumps(r.as_dict(), indent=2) if args.json else weights.text(r))
        d = r.as_dict()
        return 0 if d["identical"] == d["compared"] and d["compared"] else 1
    report = doctor.doctor(args.checkpoint)
    print(json.dumps(report, indent=2) if args.json else doctor.text(report))
    return 0


# One table from error class to exit code; the most specific class listed wins. 2: the command cannot run
# as asked (nothing written); 1: the input or the output failed (a checkpoint, the disk, a rank), or a
# validator's verdict is "not valid"; 130: interrupted, finished shards kept.
EXIT_CODES: dict[type[BaseException], int] = {
    UsageError: 2,
    OutputStateError: 2,
    CheckpointError: 1,
    ConsumerError: 1,
    ConversionRefused: 1,
    OutputError: 1,
    ModeloptStreamingError: 1,
}
WRITING_COMMANDS = ("quantize", "convert", "decompress")


def exit_code_of(error: BaseException) -> int:
    """The exit code of an error the tool raised on purpose (``EXIT_CODES``, by the class's nearest listed base)."""
    return next(EXIT_CODES[c] for c in type(error).__mro__ if c in EXIT_CODES)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = {
        "quantize": _run_quantize,
        "convert": _run_interchange,
        "decompress": _run_interchange,
        "evaluate": _run_evaluate,
    }
    if args.command in WRITING_COMMANDS:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return runs.get(args.command, _run_validation)(args)
    except ModeloptStreamingError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return exit_code_of(e)
    except KeyboardInterrupt:
        if args.command not in WRITING_COMMANDS:
            raise
        print(f"interrupted; finished shards are kept. Resume with:\n  {_resume_command(argv)}", file=sys.stderr)
        return 130
    except OSError as e:  # reading a file the stages did not expect to fail on (permissions, a vanished file)
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if getattr(args, "debug", False):
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _resume_command(argv: list[str] | None) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    words = [w for w in words if w not in ("--overwrite", "--resume")] + ["--resume"]
    return "modelopt-streaming " + " ".join(shlex.quote(w) for w in words)


@contextlib.contextmanager
def _messages_to_stderr(quiet: bool) -> Iterator[None]:
    """The jobs' messages (the ``modelopt_streaming`` logger) on stderr, one bare line each, for one command;
    none at all when ``quiet``. The logger is put back as it was: ``main`` may run many times in a process."""
    logger = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    # Above CRITICAL when quiet: no record is made, so logging's last-resort handler prints none either.
    logger.setLevel(logging.CRITICAL + 1 if quiet else logging.INFO)
    logger.propagate = False  # printed here once, whatever handlers the root logger has
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _gptq_settings(args):
    """``GptqSettings`` from the ``--gptq_*`` options (None unless ``--algorithm gptq``; refused without it)."""
    from modelopt_streaming.jobs.gptq import GptqSettings

    given = {
        "scales": args.gptq_scales,
        "act_order": False if args.gptq_natural_order else None,
        "damp": args.gptq_damp,
        "block_size": args.gptq_block_size,
        "min_expert_tokens": args.gptq_min_expert_tokens,
        "sequential": False if args.gptq_not_sequential else None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.algorithm != "gptq":
        if given:
            raise UsageError("the --gptq_* options need --algorithm gptq")
        return None
    return GptqSettings(**given)


def _run_quantize(args) -> int:
    from modelopt_streaming.jobs.distributed import init_distributed
    from modelopt_streaming.jobs.quantize import quantize, quantize_gptq
    from modelopt_streaming.jobs.quantize_job import QuantizeOptions

    device, distributed = init_distributed(args.device)
    other_rank = distributed and int(os.environ.get("RANK", "0")) != 0  # rank 0 alone speaks
    quiet = args.quiet or other_rank
    try:
        # The options are the parser's arguments of the same names.
        given = {f.name: vars(args)[f.name] for f in dataclasses.fields(QuantizeOptions) if f.name in vars(args)}
        options = QuantizeOptions(**{**given, "device": device, "progress": "none" if quiet else "auto"})
        gptq = _gptq_settings(args)
        with _messages_to_stderr(quiet):
            if gptq is not None:
                summary = quantize_gptq(args.input_dir, args.output_dir, gptq=gptq, options=options)
            else:
                summary = quantize(args.input_dir, args.output_dir, options=options)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if other_rank:
        return 0
    if args.json:
        import json

        print(json.dumps({"dry_run": args.dry_run, **summary.as_dict()}, indent=2))
        return 0
    title = "plan (dry run, nothing written)" if args.dry_run else f"wrote {summary.output_dir}"
    print(f"{title}\n" + "\n".join(f"  {line}" for line in summary.lines()))
    return 0


def _run_evaluate(args) -> int:
    from modelopt_streaming.jobs.distributed import init_distributed
    from modelopt_streaming.jobs.evaluate import evaluate

    # Under torchrun the ranks split the rows (one GPU each); rank 0 alone speaks.
    device, distributed = init_distributed(args.device)
    other_rank = distributed and int(os.environ.get("RANK", "0")) != 0
    quiet = args.quiet or other_rank
    try:
        with _messages_to_stderr(quiet):
            report = evaluate(
                args.source,
                args.checkpoint,
                data=args.data,
                samples=args.samples,
                seq_len=args.seq_len,
                act_quant=args.act_quant,
                dtype=args.dtype,
                device=device,
                batch_size=args.batch_size,
                host_budget_bytes=args.host_budget,
                plot=args.plot,
                progress="none" if quiet else "auto",
                trust_remote_code=args.trust_remote_code,
            )
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if other_rank:
        return 0
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0


def _run_interchange(args) -> int:
    import json

    from modelopt_streaming.jobs.convert import convert
    from modelopt_streaming.jobs.decompress import decompress

    resumable = {"overwrite": args.overwrite, "resume": args.resume, "verify": args.verify}
    with _messages_to_stderr(quiet=False):
        if args.command == "convert":
            summary = convert(args.input_dir, args.output_dir, args.to, force=args.force, **resumable)
        else:
            summary = decompress(
                args.input_dir, args.output_dir, args.dtype, max_shard_size=args.max_shard_size, **resumable
            )
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(f"wrote {args.output_dir}\n" + "\n".join(f"  {line}" for line in summary.lines()))
    return 1 if getattr(summary, "failed", False) else 0


if __name__ == "__main__":
    sys.exit(main())
