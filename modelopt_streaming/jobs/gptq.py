"""GPTQ in a calibrated quantize run: each decoder layer's quantized units solved against the Hessians of their
inputs while the layer is on the device (``engine.calibrate``'s ``WeightSolver``), written at their planned
offsets, and the layer's weights replaced by their dequantized values, so that (sequential, the default) the
next layer's inputs are those of the already quantized model.

- Scales are fixed before the loop: a fused group's one global scale from the max of its members (as every
  algorithm computes it), each member's block scales from ``scales`` (``mse``, the default: the block scale search
  of ``codec.mse``; or ``rtn``, ModelOpt's); GPTQ chooses the codes (``codec.gptq``). A weight keeps the encoding
  with the smallest output error on its calibration inputs among GPTQ's, its scales' own and round-to-nearest's,
  so none is worse there than round-to-nearest; the weights where GPTQ did not win are reported.
- Members of a fused group share their input, hence one Hessian. Routed experts: each its own, from the tokens
  routed to it; an expert with fewer than ``min_expert_tokens`` is encoded by ``mse`` (data-free) and reported.
- Resume: the encoded units of shards not finished when a boundary is kept are kept beside it
  (``gptq_pending.safetensors``, bounded by the open shards), so a resumed run writes the layers before its
  boundary from there and never needs their Hessians again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modelopt_streaming.codec import Codec, gptq, nvfp4, select_codec
from modelopt_streaming.engine.calibrate import SOLVE_RESERVE_BYTES, Calibration, WeightSolver
from modelopt_streaming.engine.hessian import ExpertHessians, HessianSum
from modelopt_streaming.engine.model import family_of_config
from modelopt_streaming.errors import UsageError
from modelopt_streaming.jobs.quantize_job import QuantizeJob
from modelopt_streaming.jobs.quantize_stream import LiveUnits, _encode_unit
from modelopt_streaming.plan.build import QuantizeUnit

__all__ = ["GptqSettings", "GptqUnits"]

PENDING_FILE = "gptq_pending.safetensors"

# A routed expert with fewer tokens than this is encoded by mse, data-free: its Hessian has at most this rank,
# and GPTQ would fit the codes to a handful of tokens.
MIN_EXPERT_TOKENS = 64
SCALES = ("mse", "rtn")

_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")
_FEW_TOKENS = object()  # an expert encoded by mse, without GPTQ


@dataclass(frozen=True)
class GptqSettings:
    """How GPTQ runs. ``scales``: where the block scales fixed before the loop come from (``mse`` or ``rtn``).
    ``expert_budget_bytes`` (device memory for one group of experts' Hessians; None: on a GPU its free memory
    once a layer is there, less a reserve for the solves) changes no bits; every other field is part of the
    run's fingerprint."""

    scales: str = "mse"
    # Act order by default: on SmolLM2-135M it removed 61% of rtn's weight-only KL against 42% in natural order
    # (docs/quality.md).
    act_order: bool = True
    damp: float = gptq.DAMP
    block_size: int = gptq.GPTQ_BLOCK
    min_expert_tokens: int = MIN_EXPERT_TOKENS
    sequential: bool = True
    expert_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.scales not in SCALES:
            raise UsageError(f"--gptq_scales must be one of {', '.join(SCALES)}, not {self.scales!r}")
        if not 0 < self.damp < 1:
            raise UsageError(f"--gptq_damp must be in (0, 1), not {self.damp}")
        if self.block_size < 1:
            raise UsageError(f"--gptq_block_size must be at least 1, not {self.block_size}")
        if self.min_expert_tokens < 1:
            raise UsageError(f"--gptq_min_expert_tokens must be at least 1, not {self.min_expert_tokens}")

    def settings(self) -> dict:
        """What the bytes depend on (the recipe's ``algorithm_settings``: provenance and resume fingerprint)."""
        return {k: v for k, v in asdict(self).items() if k != "expert_budget_bytes"}

    def key(self) -> str:
        return json.dumps({"weights": "gptq", **self.settings()}, sort_keys=True)


def _batch_cap(shape) -> int:
    """Weights of ``shape`` [out, in] solved at once: their float32 copies, Hessians (the stacked input, the
    solve's copy and its factor) and scratch within the engine's reserve for the solves."""
    n_out, n_in = int(shape[-2]), int(shape[-1])
    per_weight = 4 * (3 * n_in * n_in + 4 * n_out * n_in)
    return max(1, min(64, SOLVE_RESERVE_BYTES // per_weight))


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _exchange(results: dict[int, list]) -> dict[int, list]:
    """Every rank's solved units (unit index -> the codes, block scales and global scale of each weight) on
    every rank, so that all of them hold the same quantized layer."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    return {k: v for part in parts for k, v in part.items()}


class GptqUnits:
    """The job's side of GPTQ: which Hessian each quantized module needs (``key_of``), the solve of every unit a
    layer holds (``solve``), its writing through the run's live writer when its shard is still to be written,
    and the encoded units kept for a resume (``save``, ``restore``)."""

    def __init__(self, job: QuantizeJob, live: LiveUnits, settings: GptqSettings):
        self.job, self.live, self.settings = job, live, settings
        self.leaves = family_of_config(job.index.config, str(job.index.root)).expert_leaves
        self.units = [u for u in job.plan.units if isinstance(u, QuantizeUnit)]
        self.todo = {id(u) for u in live.todo}
        # Under torchrun every rank runs every layer and solves every world-th unit; the codes are exchanged.
        self.rank, self.world = job.rank, job.world
        self.index = {id(u): i for i, u in enumerate(self.units)}
        self.shard_of = {id(u): s.file for s in job.plan.shards for u in s.units}
        self._key: dict[str, str] = {}
        for unit in self.units:
            if unit.layout == "linear":
                for module in unit.modules:
                    if self._expert(module) is None:
                        self._key[module] = "+".join(unit.modules)
        self.solved: set[int] = set()
        self.restored: set[int] = set()  # written from the encodings an earlier run kept
        self.pending: dict[int, list[tuple[str, torch.Tensor]]] = {}  # written, shard not yet finished
        # Weights where GPTQ with the settings was not the best on the calibration inputs, by module or
        # "<3-D experts tensor>[<expert>]": the encoding kept instead ("gptq_rtn_scales", "gptq_natural_order", ...,
        # "mse", "rtn"; ``_best``).
        self.lost: dict[str, str] = {}
        self.rtn_codec = select_codec(job.device, "rtn")
        self.mse_codec = select_codec(job.device, "mse")

    def solver(self) -> WeightSolver:
        return WeightSolver(
            key_of=self._key.get,
            solve=self.solve,
            expert_budget_bytes=self.settings.expert_budget_bytes,
            sequential=self.settings.sequential,
        )

    def _expert(self, module: str) -> tuple[str, int, str] | None:
        """(experts module, expert, "gate_up" or "down") of a per-expert checkpoint module, else None."""
        m = _EXPERT.match(module)
        if m is None or self.leaves is None or m["leaf"] not in self.leaves:
            return None
        return m["experts"], int(m["e"]), "down" if m["leaf"] == self.leaves[2] else "gate_up"

    def _expert_hessian(self, hessians: ExpertHessians, experts: str, e: int, kind: str):
        if e not in hessians.selected:
            return None
        if hessians.tokens(e) < self.settings.min_expert_tokens:
            return _FEW_TOKENS
        return (hessians.down if kind == "down" else hessians.gate_up)[e].h

    def _hessians(self, unit: QuantizeUnit, linears: dict[str, HessianSum], experts: dict[str, ExpertHessians]):
        """One Hessian (or ``_FEW_TOKENS``) per 2-D weight the codec will be given, in its order; None when this call
        does not hold them."""
        if unit.layout == "experts_3d":
            (name,) = unit.modules
            module, leaf = name.rsplit(".", 1)
            hessians = experts.get(module)
            if hessians is None:
                return None
            n = unit.sources[0].shape[0]
            if len(hessians.selected) != n:
                raise NotImplementedError(
                    f"{name}: GPTQ of 3-D experts whose Hessians do not fit the device together is not built"
                )
            kind = "down" if leaf.startswith("down") else "gate_up"
            return [self._expert_hessian(hessians, module, e, kind) for e in range(n)]
        out = []
        for module in unit.modules:
            where = self._expert(module)
            if where is not None:
                hessians = experts.get(where[0])
                h = None if hessians is None else self._expert_hessian(hessians, *where)
            else:
                s = linears.get(self._key[module])
                h = None if s is None else s.h
            if h is None:
                return None
            out.append(h)
        return out

    def solve(
        self,
        path: str,
        views: dict[str, torch.Tensor],
        linears: dict[str, HessianSum],
        experts: dict[str, ExpertHessians],
        calibration: Calibration,
    ) -> None:
        """GPTQ of every unit whose tensors ``views`` holds and whose Hessians this call gives; the dequantized
        weights replace the live ones in place; a unit still to be written is written."""
        from modelopt_streaming.jobs.calibration import _input_scale

        job, options = self.job, self.job.options
        scales = {} if options.weight_only else calibration.input_amax
        scales = {m: _input_scale(a, options.scale_math) for m, a in scales.items()}
        recipe = dataclasses.replace(job.recipe, input_scales=tuple(sorted(scales.items())))
        ready = []
        for unit in self.units:
            if id(unit) in self.solved or not all(s.name in views for s in unit.sources):
                continue
            hessians = self._hessians(unit, linears, experts)
            if hessians is not None:
                ready.append((unit, hessians))
        results = {}
        owned = [(u, h) for u, h in ready if self.index[id(u)] % self.world == self.rank]
        for chunk in self._chunks(owned):
            for unit, encoded, used in self._encode_chunk(chunk, views, recipe):
                if self.world == 1:
                    self._write_back(unit, views, used)  # at once: a layer's codes need not wait on the GPU
                else:
                    # Block scales travel as bytes: torch's pickling of float8 storages does not load back.
                    results[self.index[id(unit)]] = [
                        (p.cpu(), s.view(torch.uint8).cpu(), s2.cpu()) for p, s, s2 in used
                    ]
                # A unit a resumed run already wrote from the kept encodings is solved again all the same (its
                # layer must hold the dequantized weights for the next layer's inputs), to the same bytes.
                if id(unit) in self.todo and id(unit) not in self.live.written:
                    self.live.write(unit, encoded)
                    self.pending[id(unit)] = encoded
        if self.world > 1:
            results = _exchange(results)
            results = {k: [(p, s.view(torch.float8_e4m3fn), s2) for p, s, s2 in v] for k, v in results.items()}
        for unit, _ in ready:
            if self.world > 1:
                self._write_back(unit, views, results[self.index[id(unit)]])
            self.solved.add(id(unit))
            if id(unit) in self.todo:
                self.live.written.add(id(unit))  # written by the rank that solved it
        self._prune()

    def _chunks(self, owned: list) -> list[list]:
        """The owned units in runs whose weights are solved together (``gptq_quantize_many``): the column loop's
        launches are shared by a run's experts. A run holds at most as many weights as ``_batch_cap`` allows."""
        out, current, weights = [], [], 0
        for unit, hessians in owned:
            shape = unit.sources[0].shape
            cap = _batch_cap(shape[-2:] if unit.layout == "linear" else (shape[2], shape[1]))
            if current and weights + len(hessians) > cap:
                out.append(current)
                current, weights = [], 0
            current.append((unit, hessians))
            weights += len(hessians)
        return out + [current] if current else out

    def _encode_chunk(self, chunk: list, views: dict[str, torch.Tensor], recipe) -> list:
        """``(unit, encoded tensors, [(packed, block scales, global scale) per 2-D weight])`` for each unit of the
        chunk. The scales' encoding (``settings.scales``; mse for an expert with few tokens) is run first to get
        each weight's scales (and the exact weight the codec sees, a 3-D expert transposed), the weights of one
        shape are solved together, and the encoding is run again with the chosen codes and scales."""
        job, settings = self.job, self.settings
        # [unit position, weight, Hessian or _FEW_TOKENS, global scale, codes, block scales]
        problems: list[list] = []
        members_of = []
        for k, (unit, hessians) in enumerate(chunk):
            members = [views[s.name].to(job.device) for s in unit.sources]
            members_of.append(members)
            order = iter(hessians)

            def record(w, weight_scale_2, k=k, order=order):
                h = next(order)
                # job.codec: the settings' scales' own codec (jobs.quantize selects it for a gptq run).
                codec = self.mse_codec if h is _FEW_TOKENS else job.codec
                packed, block_scales = codec.quantize(w, weight_scale_2)
                problems.append([k, w, h, weight_scale_2, packed, block_scales])
                return packed, block_scales

            self._run_encode(unit, members, record, recipe)
        chosen = [(p[4], p[5]) for p in problems]
        by_shape: dict[tuple, list[int]] = {}
        for j, p in enumerate(problems):
            if p[2] is not _FEW_TOKENS:
                by_shape.setdefault(tuple(p[1].shape), []).append(j)
        for shape, js in by_shape.items():
            cap = _batch_cap(shape)
            for start in range(0, len(js), cap):
                part = js[start : start + cap]
                solved = gptq.gptq_quantize_many(
                    torch.stack([problems[j][1] for j in part]),
                    torch.stack([problems[j][2] for j in part]),
                    torch.stack([problems[j][3].reshape(()) for j in part]),
                    torch.stack([problems[j][5] for j in part]),
                    damp=settings.damp,
                    block_size=settings.block_size,
                    act_order=settings.act_order,
                )
                for j, packed in zip(part, solved):
                    chosen[j] = self._best(chunk, j, problems, packed)
        out = []
        for k, (unit, _hessians) in enumerate(chunk):
            mine = [j for j, p in enumerate(problems) if p[0] == k]
            replay = iter(mine)
            used = []

            def give(w, weight_scale_2, replay=replay, used=used):
                j = next(replay)
                used.append((*chosen[j], problems[j][3]))
                return chosen[j]

            encoded = self._run_encode(unit, members_of[k], give, recipe)
            out.append((unit, encoded, used))
        return out

    def _best(self, chunk: list, j: int, problems: list, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of GPTQ's codes, the scales' own encoding and round-to-nearest's, the (codes, block scales) with the
        smallest output error on the calibration inputs (``tr(Δ H Δᵀ)``, the undamped Hessian; the earlier on a
        tie). Where GPTQ with the settings is not the best, GPTQ over the other block scales and in the other
        column order are tried too (a few small weights; each one more solve). GPTQ is greedy, and against block
        scales fixed beforehand a weight pushed past its block's largest code saturates, so on a small or
        outlier-heavy weight it can lose; and mse minimizes the weight's error, not the output's, which on
        inputs with outlier channels can be far from it. The tiny Llama's layer-0 k_proj (32 x 64), output
        errors: mse's encoding 199, GPTQ over mse's scales 195, round-to-nearest's 78, GPTQ over its scales 79,
        the same in act order 51."""
        settings = self.settings
        _k, w, h, scale_2, base, block_scales = problems[j]
        # Insertion order is the preference on a tie (``min`` keeps the first).
        candidates = {"gptq": (packed, block_scales), settings.scales: (base, block_scales)}
        if settings.scales != "rtn":
            candidates["rtn"] = self.rtn_codec.quantize(w, scale_2)

        def error(name: str) -> float:
            codes, scales = candidates[name]
            return gptq.output_error(w, nvfp4.dequantize(codes, scales, scale_2), h)

        errors = {name: error(name) for name in candidates}
        if min(errors, key=errors.get) != "gptq":
            scale_sets = {settings.scales: block_scales, "rtn": candidates["rtn"][1]}
            for scales, act_order in itertools.product(scale_sets, (settings.act_order, not settings.act_order)):
                if (scales, act_order) == (settings.scales, settings.act_order):
                    continue
                name = "gptq" + ("_rtn_scales" if scales != settings.scales else "")
                if act_order != settings.act_order:
                    name += "_act_order" if act_order else "_natural_order"
                candidates[name] = gptq.gptq_quantize(
                    w, h, scale_2, scale_sets[scales], settings.damp, settings.block_size, act_order
                )
                errors[name] = error(name)
        best = min(errors, key=errors.get)
        if best != "gptq":
            self.lost[self._weight_name(chunk[problems[j][0]][0], j, problems)] = best
        return candidates[best]

    @staticmethod
    def _weight_name(unit: QuantizeUnit, j: int, problems: list) -> str:
        """The module of problem ``j`` (its position among its unit's weights), or ``<3-D tensor>[<expert>]``."""
        i = [p[0] for p in problems[:j]].count(problems[j][0])
        return f"{unit.modules[0]}[{i}]" if unit.layout == "experts_3d" else unit.modules[i]

    def _run_encode(self, unit: QuantizeUnit, members: list[torch.Tensor], quantize, recipe):
        wrapped = Codec(self.job.codec.tensor_amax, quantize, f"GPTQ over {self.job.codec.name}")
        job = self.job
        return _encode_unit(unit, members, wrapped, recipe, job.options.allow_nonfinite, job.input_dir, job.reciprocals)

    @staticmethod
    def _write_back(unit: QuantizeUnit, views: dict[str, torch.Tensor], used: list) -> None:
        """The live weights become the values the written codes dequantize to (what the next layer will see)."""
        if unit.layout == "experts_3d":
            view = views[unit.sources[0].name]
            for e, (packed, block_scales, scale_2) in enumerate(used):
                deq = nvfp4.dequantize(packed.to(view.device), block_scales.to(view.device), scale_2.to(view.device))
                view[e].copy_(deq.t().to(view.dtype))
            return
        for src, (packed, block_scales, scale_2) in zip(unit.sources, used):
            view = views[src.name]
            deq = nvfp4.dequantize(packed.to(view.device), block_scales.to(view.device), scale_2.to(view.device))
            view.copy_(deq.to(view.dtype))

    # -- resume ------------------------------------------------------------------------------------------------

    def _prune(self) -> None:
        """Forget the encodings of units whose shards are finished: the host memory kept for a resume stays that
        of the shards still open, not of every unit since the last boundary (a boundary is kept every 10 minutes,
        several DeepSeek-V3 layers)."""
        done = self.job.state.dir
        self.pending = {u: t for u, t in self.pending.items() if not (done / self.shard_of[u]).exists()}

    def save(self, directory: Path, key: str) -> None:
        """Keep the encoded units whose shards are not finished (the others are in the output already)."""
        from safetensors.torch import save_file

        self._prune()
        tensors = {name: t.clone() for encoded in self.pending.values() for name, t in encoded}  # no shared storage
        # The compressed-tensors dialect's exact-reciprocal records of these tensors (interchange.ExactReciprocals):
        # the shard's record needs them, and a resumed run writes the tensors without encoding them again.
        exact = {n: list(v) for n, v in self.job.reciprocals.record.items() if n in tensors}
        partial = directory / f".{PENDING_FILE}.partial"
        meta = {"key": _key_digest(key), "lost": json.dumps(self.lost), "reciprocals": json.dumps(exact)}
        save_file(tensors, str(partial), metadata=meta)
        os.replace(partial, directory / PENDING_FILE)

    def restore(self, directory: Path | None, key: str) -> None:
        """Write the units of shards still to be written that an earlier run solved and kept."""
        from safetensors import safe_open

        path = directory / PENDING_FILE if directory is not None else None
        if path is None or not path.is_file():
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != _key_digest(key):
                return
            self.lost = json.loads(meta.get("lost", "{}"))
            exact = {n: tuple(v) for n, v in json.loads(meta.get("reciprocals", "{}")).items()}
            names = set(f.keys())
            for unit in self.units:
                if id(unit) not in self.todo or id(unit) in self.live.written:
                    continue
                outputs = [t.name for t in unit.outputs]
                if all(n in names for n in outputs):
                    encoded = [(n, f.get_tensor(n)) for n in outputs]
                    self.job.reciprocals.record.update({n: exact[n] for n in outputs if n in exact})
                    self.live.write(unit, encoded)
                    self.pending[id(unit)] = encoded
                    self.restored.add(id(unit))

    def report(self, calibration: Calibration) -> dict:
        """(Every rank calls it: under torchrun the ranks' findings are merged.)"""
        lost = self.lost
        if self.world > 1:
            import torch.distributed as dist

            parts: list = [None] * self.world
            dist.all_gather_object(parts, lost)
            lost = {k: v for part in parts for k, v in part.items()}
        return self._report(calibration, lost)

    def _report(self, calibration: Calibration, lost: dict[str, str]) -> dict:
        """What the summary, ``--json`` and the provenance say about the weights' algorithm: the experts encoded
        by mse for lack of tokens (from the routed token counts, which are the counts of their Hessians, so a
        resumed run reports the layers before its boundary too), the weights where GPTQ's codes were not the
        best on the calibration inputs and the encoding kept instead, and any unit of this run that no layer
        held (written by the stream with the scales' own encoding)."""
        quantized = {where[0] for u in self.units for m in u.modules if (where := self._expert(m)) is not None}
        quantized |= {u.modules[0].rsplit(".", 1)[0] for u in self.units if u.layout == "experts_3d"}
        low = self.settings.min_expert_tokens
        few = {
            m: [e for e, n in enumerate(tokens) if n < low]
            for m, tokens in sorted(calibration.expert_tokens.items())
            if m in quantized
        }
        return {
            "algorithm": "gptq",
            **self.settings.settings(),
            "experts_few_tokens_mse": {m: e for m, e in few.items() if e},
            "units_not_solved": [
                u.modules[0]
                for u in self.units
                if id(u) in self.todo and id(u) not in self.solved and id(u) not in self.restored
            ],
            "gptq_not_better": dict(sorted(lost.items())),
        }
