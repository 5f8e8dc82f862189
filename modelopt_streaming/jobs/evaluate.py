"""``evaluate``: what NVFP4 did to a model's outputs, in one streamed pass over the source and the quantized
checkpoint together.

Each decoder layer of both checkpoints is materialized once, and two hidden streams advance through it: the
source's through the source weights, the quantized one's through the checkpoint's weights dequantized as vLLM's
emulation does (and, for W4A4, every quantized input quantize-dequantized: ``engine/quantized.py``). After the
last layer the final norm and ``lm_head`` of each give the logits, and the report compares the two
distributions per token: mean KL(P_source || P_quantized) and its p99, top-1 agreement, the perplexity of each
on the data's own next tokens, and after every layer the relative error ||h_q - h_s|| / ||h_s|| over all
tokens, so the layer where the damage enters is visible.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from modelopt_streaming.engine.data import load_calibration_data
from modelopt_streaming.engine.hidden import HiddenStore, default_host_budget
from modelopt_streaming.engine.model import family_of_config, text_config_dict
from modelopt_streaming.engine.quantized import QuantizedCheckpoint, QuantizedLayerStream
from modelopt_streaming.engine.runner import EngineOptions, LayerStream
from modelopt_streaming.errors import UsageError
from modelopt_streaming.jobs.distributed import batch_share, rank_and_world
from modelopt_streaming.jobs.quantize import resolve_io_threads
from modelopt_streaming.source.hub_cache import resolve_checkpoint_dir
from modelopt_streaming.source.index import build_index
from modelopt_streaming.source.reader import TensorReader

__all__ = ["DEFAULT_TEXT", "EvaluationReport", "evaluate"]

_log = logging.getLogger(__name__)

# The evaluation text shipped with the package (never the calibration text): Isaac Newton, "Opticks" (4th
# edition, 1730), the Project Gutenberg transcription (eBook #33504), public domain; libbacktrace ships the same
# file as test data. Named and fingerprinted in every report.
DEFAULT_TEXT = "newton-opticks.txt"
DEFAULT_TEXT_NAME = 'Isaac Newton, "Opticks" (1730), Project Gutenberg eBook #33504, public domain'
DEFAULT_SEQ_LEN = 2048
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class EvaluationReport:
    """The figures of one evaluation (``as_dict`` is ``--json``)."""

    kl_mean: float
    kl_p99: float
    top1_agree: float
    ppl: float
    source_ppl: float
    layers: list[float]  # relative error of the hidden state after each decoder layer
    embed_rel_error: float
    data: dict
    checkpoint: dict
    engine: dict
    tokens: int
    seconds: float
    plot: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "kl_mean": self.kl_mean,
            "kl_p99": self.kl_p99,
            "top1_agree": self.top1_agree,
            "ppl": self.ppl,
            "source_ppl": self.source_ppl,
            "layers": self.layers,
            "embed_rel_error": self.embed_rel_error,
            "tokens": self.tokens,
            "data": self.data,
            "checkpoint": self.checkpoint,
            "engine": self.engine,
            "seconds": self.seconds,
            "plot": self.plot,
        }

    def worst_jump(self) -> int:
        """The layer whose output error rose most over its input's (the embedding's for layer 0)."""
        before = [self.embed_rel_error, *self.layers[:-1]]
        return max(range(len(self.layers)), key=lambda i: self.layers[i] - before[i])

    def lines(self) -> list[str]:
        d = self.data
        out = [
            f"data: {d.get('name') or d['source']}, {d['rows']} x {d['seq_len']} tokens (sha256 {d['sha256'][:16]})",
            f"checkpoint: {self.checkpoint['format']}, {'W4A4' if self.checkpoint['act_quant'] else 'W4A16'}, "
            f"{self.checkpoint['nvfp4_weights']} NVFP4 weights"
            + (
                f"; {len(self.checkpoint['scales_collapsed_by_vllm'])} run with their fused group's scale, as vLLM "
                "runs them"
                if self.checkpoint.get("scales_collapsed_by_vllm")
                else ""
            ),
            f"KL(source || quantized) per token: mean {self.kl_mean:.6g}, p99 {self.kl_p99:.6g}",
            f"top-1 agreement: {100 * self.top1_agree:.2f}%",
            f"perplexity: quantized {self.ppl:.4f}, source {self.source_ppl:.4f} "
            f"({100 * (self.ppl / self.source_ppl - 1):+.2f}%)",
            "relative error of the hidden state after each layer (||h_q - h_s|| / ||h_s||):",
            f"  embedding {self.embed_rel_error:.4g}",
        ]
        out += [f"  layer {i:>3} {e:.4g}" for i, e in enumerate(self.layers)]
        out.append(f"largest rise at layer {self.worst_jump()}; {self.tokens} tokens in {self.seconds:.1f} s")
        if self.plot:
            out.append(f"plot: {self.plot}")
        return out


def default_text_path() -> Path:
    return Path(str(resources.files("modelopt_streaming.jobs") / "evaldata" / DEFAULT_TEXT))


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1)") from None


def _load_data(path, source_dir: Path, vocab: int, samples, seq_len, trust_remote_code: bool):
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be at least 1, not {samples}")
    if seq_len is not None and seq_len < 2:
        raise UsageError(f"--seq_len must be at least 2 (perplexity needs a next token), not {seq_len}")
    given = path is not None
    text = Path(path) if given else default_text_path()
    try:
        data = load_calibration_data(
            text,
            source_dir,
            vocab_size=vocab,
            size=samples,
            seq_len=seq_len or (None if given else DEFAULT_SEQ_LEN),
            trust_remote_code=trust_remote_code,
        )
    except UsageError as e:
        message = str(e).replace("--calib_data", "--data").replace("--calib_size", "--samples")
        raise UsageError(message.replace("--calib_seq_len", "--seq_len")) from None
    if data.input_ids.shape[1] < 2:
        raise UsageError(f"--data {text}: rows of {data.input_ids.shape[1]} token; perplexity needs at least 2")
    info = data.as_dict()
    if not given:
        info["name"] = DEFAULT_TEXT_NAME
        info["file_sha256"] = hashlib.sha256(text.read_bytes()).hexdigest()
    return data, info


def _head(stream, has) -> str:
    return "lm_head" if has(stream.checkpoint_name("lm_head.weight")) else "model.embed_tokens"


def evaluate(
    source: str | os.PathLike,
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    act_quant: str = "auto",
    dtype: str = "bfloat16",
    device: str | None = None,
    batch_size: int = 1,
    plot: str | os.PathLike | None = None,
    progress: str = "auto",
    host_budget_bytes: int | None = None,
    trust_remote_code: bool = False,
) -> EvaluationReport:
    """Measure what the NVFP4 checkpoint ``checkpoint`` did to the outputs of its source ``source``.

    Args:
        source: the unquantized checkpoint (any source format the engine reads).
        checkpoint: the NVFP4 checkpoint (ModelOpt or compressed-tensors, any producer), of the same architecture.
        data: what ``quantize --calib_data`` takes; default the evaluation text shipped with the package.
        samples: rows to use (default all the data gives). seq_len: tokens per row of text (default 2048).
        act_quant: "auto" (W4A4 when the checkpoint's config says so), "on", "off".
        dtype: "bfloat16" (the source's dtype) or "float32" (weights and activations upcast: the only error left
            is the quantization's).
        device: where each layer runs (default cuda when there is one). batch_size: rows per forward.
        plot: a PNG path for the per-layer curve (needs matplotlib).
        progress: "auto" (a bar on a terminal), "bar", "log", "none".
        host_budget_bytes: bytes of hidden states kept in host memory by each of the pass's four stores (each
            stream's layer input and output), a memory-mapped file beyond; None: ``default_host_budget(4)``.

    Raises:
        UsageError: bad data, an unquantized checkpoint, options out of range, an architecture the engine does
            not run.
        CheckpointError: a tensor the model needs is missing from the checkpoint or has another shape (the
            first one named).
    """
    started = time.monotonic()
    if dtype not in _DTYPES:
        raise UsageError(f"--dtype {dtype!r}: one of {', '.join(_DTYPES)}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, not {batch_size}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("evaluate runs the model with transformers: pip install 'modelopt-streaming[calib]'") from None
    src_dir, q_dir = resolve_checkpoint_dir(source), resolve_checkpoint_dir(checkpoint)
    src_index, q_index = build_index(src_dir), build_index(q_dir)
    family_of_config(src_index.config, str(src_dir))
    quantized = QuantizedCheckpoint(q_index)
    on = quantized.resolve_act_quant(act_quant)
    text, _ = text_config_dict(src_index.config)
    vocab = text.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise UsageError(f"{src_dir / 'config.json'}: no vocab_size to check the token ids against")
    rows, data_info = _load_data(data, src_dir, vocab, samples, seq_len, trust_remote_code)
    ids = rows.input_ids
    threads = resolve_io_threads()
    options = EngineOptions(
        device=_device(device),
        dtype=_DTYPES[dtype],
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        read_threads=threads,
    )
    with TensorReader(src_dir, threads=threads) as src_reader, TensorReader(q_dir, threads=threads) as q_reader:
        src = LayerStream(src_index, src_reader, options)
        q = QuantizedLayerStream(quantized, q_reader, src_index.config, options, on)
        budget = default_host_budget(4) if host_budget_bytes is None else host_budget_bytes
        rank, world = rank_and_world()
        figures = _run(src, q, ids, options, budget, progress if rank == 0 else "none", rank, world)
        collapsed = quantized.collapsed_groups(q_reader)
    if collapsed and rank == 0:
        _log.warning(
            "%d NVFP4 weights carry a scale other than their fused group's; vLLM runs them with the group's "
            "(the largest for a fused linear, the gate's for an expert's up projection), and so did this "
            "evaluation: first %s",
            len(collapsed),
            collapsed[0],
        )
    report = EvaluationReport(
        **figures,
        data=data_info,
        checkpoint={
            "path": str(q_dir),
            "format": quantized.fmt,
            "act_quant": on,
            "nvfp4_weights": len(quantized.weights),
            "scales_collapsed_by_vllm": collapsed,
        },
        engine={
            "device": str(options.device),
            "dtype": dtype,
            "attention": src.skeleton.attn_implementation,
            "batch_size": batch_size,
            "ranks": world,  # torchrun processes, each running every world-th batch
        },
        tokens=ids.numel(),
        seconds=time.monotonic() - started,
    )
    if plot is not None and rank == 0:
        report.plot = str(write_plot(report, plot))
    return report


def _run(
    src: LayerStream,
    q: QuantizedLayerStream,
    ids: torch.Tensor,
    options,
    budget: int,
    progress: str,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """The two streams layer by layer over the rows. Under torchrun (``world`` > 1) each rank runs every
    ``world``-th batch of ``batch_size`` rows (whole batches: every row meets the batch it meets in one process)
    and keeps each batch's contribution to every figure apart; the ranks exchange them and every rank adds them
    up in batch order, as one process does, so the figures are one process's whatever the rank count."""
    layers = src.num_layers
    # Every module of the quantized checkpoint is checked against the source's architecture before any work, so
    # a mismatch is named at once, not after hours.
    q_head = _head(q, q.has_tensor)
    for name in ["model.embed_tokens", *(f"model.layers.{i}" for i in range(layers)), "model.norm", q_head]:
        q.sources(name)
    n, length = ids.shape
    shape = (length, src.skeleton.config.hidden_size)
    batch, device = options.batch_size, options.device
    # (first row, local first row, rows) of each batch this rank runs; its stores hold only those rows.
    mine, local = [], 0
    for start, rows in batch_share(n, batch, rank, world):
        mine.append((start, local, rows))
        local += rows

    def new_stores() -> list[HiddenStore]:
        return [HiddenStore(local, shape, options.dtype, budget, device=device) for _ in range(2)]

    parts: dict[int, dict] = {start: {"errors": []} for start, _, _ in mine}  # each batch's contributions
    stores = new_stores()
    spare: list[HiddenStore] | None = None  # the two streams' stores of the layer before, reused
    bar = _LayerProgress(layers + 2, progress)
    try:
        with src.module("model.embed_tokens") as es, q.module("model.embed_tokens") as eq, torch.no_grad():
            for start, at, rows in mine:
                hs, hq = es(ids[start : start + rows].to(device)), eq(ids[start : start + rows].to(device))
                parts[start]["errors"].append(_error_terms(hs, hq))
                stores[0][at : at + rows], stores[1][at : at + rows] = hs, hq
        bar.step("embedding")
        for layer in range(layers):
            nxt, spare = spare or new_stores(), None
            path = f"model.layers.{layer}"
            with src.module(path) as ls, q.module(path) as lq:
                for start, at, rows in mine:
                    span = slice(at, at + rows)
                    hs = src.forward(ls, layer, stores[0].load(span, device))
                    hq = q.forward(lq, layer, stores[1].load(span, device))
                    parts[start]["errors"].append(_error_terms(hs, hq))
                    nxt[0][span], nxt[1][span] = hs, hq
            stores, spare = nxt, stores
            if world == 1:
                bar.step(f"layer {layer}: rel. error {_rel_error(parts, layer + 1):.3g}")
            else:
                bar.step(f"layer {layer}")
        _logits(src, q, q_head, stores, ids, mine, parts, options)
        bar.step("logits")
    finally:
        for s in stores + (spare or []):
            s.close()
        bar.close()
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = {k: v for part in gathered for k, v in part.items()}
    return _figures(parts, layers)


def _error_terms(hs: torch.Tensor, hq: torch.Tensor) -> tuple[float, float]:
    """One batch's ``(||h_q - h_s||², ||h_s||²)`` in float64."""
    return float((hq.double() - hs.double()).pow(2).sum()), float(hs.double().pow(2).sum())


def _rel_error(parts: dict[int, dict], k: int) -> float:
    """``||h_q - h_s|| / ||h_s||`` over all tokens at step ``k`` (0: the embedding, i: after layer i - 1), its
    sums taken in batch order."""
    diff = ref = 0.0
    for start in sorted(parts):
        d, r = parts[start]["errors"][k]
        diff, ref = diff + d, ref + r
    return math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)


def _logits(src, q, q_head: str, stores, ids: torch.Tensor, mine: list, parts: dict[int, dict], options) -> None:
    """Each batch's next-token figures into ``parts``: its per-token KL, top-1 agreements, both streams'
    negative log-likelihood of the text and the tokens predicted."""
    device = options.device
    src_head = _head(src, lambda name: name in src.index.tensors)
    with (
        src.module("model.norm") as ns,
        q.module("model.norm") as nq,
        src.module(src_head) as hs_mod,
        q.module(q_head) as hq_mod,
        torch.no_grad(),
    ):
        for start, at, rows in mine:
            tokens = ids[start : start + rows].to(device)
            span = slice(at, at + rows)
            ls = _project(hs_mod, ns(stores[0].load(span, device))).float()
            lq = _project(hq_mod, nq(stores[1].load(span, device))).float()
            log_s, log_q = torch.log_softmax(ls, -1), torch.log_softmax(lq, -1)
            target = tokens[:, 1:, None]
            parts[start].update(
                kl=(log_s.exp() * (log_s - log_q)).sum(-1).reshape(-1).double().cpu(),
                agree=int((ls.argmax(-1) == lq.argmax(-1)).sum()),
                nll_s=float(log_s[:, :-1].gather(-1, target).double().sum()),
                nll_q=float(log_q[:, :-1].gather(-1, target).double().sum()),
                predicted=target.numel(),
            )


def _figures(parts: dict[int, dict], layers: int) -> dict:
    """The report's figures from every batch's contributions, added in batch order."""
    order = sorted(parts)
    kl = torch.cat([parts[b]["kl"] for b in order])
    nll_s = nll_q = 0.0
    for b in order:
        nll_s, nll_q = nll_s - parts[b]["nll_s"], nll_q - parts[b]["nll_q"]
    predicted = sum(parts[b]["predicted"] for b in order)
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99))
        if kl.numel() <= 16_000_000
        else float(kl.sort().values[int(0.99 * (kl.numel() - 1))]),
        "top1_agree": sum(parts[b]["agree"] for b in order) / kl.numel(),
        "ppl": math.exp(nll_q / predicted),
        "source_ppl": math.exp(nll_s / predicted),
        "layers": [_rel_error(parts, k) for k in range(1, layers + 1)],
        "embed_rel_error": _rel_error(parts, 0),
    }


def _project(head: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
    # lm_head's own forward (its pre-hooks run, for a W4A4 lm_head); a tied head is the embedding's weight.
    if isinstance(head, torch.nn.Linear):
        return head(normed)
    return torch.nn.functional.linear(normed, head.weight)


class _LayerProgress:
    """A bar over the pieces (embedding, layers, logits) with tqdm's ETA, or log lines with an ETA."""

    def __init__(self, total: int, mode: str):
        import sys

        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.done, self.started = mode, total, 0, time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="layer", desc="evaluate")

    def step(self, what: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
        elif self.mode == "log":
            elapsed = time.monotonic() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            _log.info(f"evaluate: {self.done}/{self.total} ({what}), ETA {eta:.0f} s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def write_plot(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """The per-layer relative error as a PNG (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'modelopt-streaming[plot]'") from None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    xs = list(range(-1, len(report.layers)))
    ax.plot(xs, [report.embed_rel_error, *report.layers], marker="o", markersize=3)
    ax.set_xlabel("decoder layer (-1: embedding)")
    ax.set_ylabel("||h_q - h_s|| / ||h_s||")
    ax.set_title(
        f"KL mean {report.kl_mean:.3g}, top-1 {100 * report.top1_agree:.1f}%, "
        f"ppl {report.ppl:.3f} vs {report.source_ppl:.3f}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
