"""How vLLM reads a ModelOpt exclude list against the layers it builds (``consumers.vllm``), and where its
decision disagrees with a checkpoint's tensors.

``ModelOptQuantConfigBase.is_layer_excluded`` (``layers/quantization/modelopt.py``, below
``vllm/model_executor/``, vLLM 0.32.0) matches a layer's name exactly with fused-shard expansion
(``is_layer_skipped`` in ``layers/quantization/utils/quant_utils.py``), then by substring, then by
``fnmatch``; before that, ``apply_vllm_mapper`` rewrites each ``prefix*`` entry into ``prefix`` and
``prefix.*`` and renames entries with the class's ``hf_to_vllm_mapper`` (only for classes that have one).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from modelopt_streaming.consumers.vllm import ConsumerLayer, Family, text_config
from modelopt_streaming.errors import PartlyExcludedFusedLayer

# ModelOptQuantConfigBase.get_quant_method (layers/quantization/modelopt.py): a prefix containing one of
# these is built unquantized even when the exclude list does not name it.
_ALWAYS_UNQUANTIZED_SUBSTRINGS = ("vision_tower", "vision_model", "vit_large_projector")


def _any_substring(entries: Iterable[str]) -> re.Pattern[str] | None:
    """The substring pass over ``entries`` as one regular expression (None: no entries)."""
    plain = [re.escape(e) for e in entries]
    return re.compile("|".join(plain)) if plain else None


def _any_fnmatch(entries: Iterable[str]) -> re.Pattern[str] | None:
    """The ``fnmatch`` pass over ``entries`` as one regular expression, matched from the start (None: no
    entries)."""
    wild = [fnmatch.translate(e) for e in entries]
    return re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None


def vllm_exclude_modules(exclude_modules: Iterable[str], family: Family | None) -> list[str]:
    """The list as vLLM holds it after ``ModelOptQuantConfigBase.apply_vllm_mapper`` (modelopt.py): run only
    for classes with an ``hf_to_vllm_mapper``; ``prefix*`` becomes ``prefix`` and ``prefix.*``, then every
    entry is renamed.

    Args:
        exclude_modules: the list as the checkpoint's config holds it.
        family: the model class's rules; None (an unknown class) leaves the list as it is.

    Returns:
        The entries vLLM matches layer names against.
    """
    entries = list(exclude_modules)
    if family is None or family.mapper is None or not entries:
        return entries
    split: list[str] = []
    for e in entries:
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            split += [e[:-1], e[:-1] + ".*"]
        else:
            split.append(e)
    return [family.mapper(e) for e in split]


class VllmExclusion:
    """``ModelOptQuantConfigBase.is_layer_excluded`` (layers/quantization/modelopt.py) for one list and class.

    Compiled once (substring and wildcard passes as one regular expression each), since a 1T-parameter
    checkpoint's list can name tens of thousands of modules.

    Args:
        exclude_modules: the list as the checkpoint's config holds it (``exclude_modules`` or ``ignore``).
        family: the model class's rules (renames, packed modules); None reads the list without either.
        config: the checkpoint's config.json, for the packed modules that depend on it (DeepSeek's MLA).
    """

    def __init__(self, exclude_modules: Iterable[str], family: Family | None, config: dict | None = None):
        self.family = family
        self.raw = tuple(exclude_modules)
        self.entries = tuple(vllm_exclude_modules(self.raw, family))
        self.packed = family.packed(text_config(config or {})) if family else {}
        self._exact = set(self.entries)
        self._expert_entries = tuple(e for e in self.entries if "experts" in e)
        self._substring = _any_substring(self.entries)  # an empty entry is a substring of every name, as there
        self._wildcard = _any_fnmatch(self.entries)

    def _skipped(self, prefix: str) -> bool:
        """``is_layer_skipped`` in exact mode (layers/quantization/utils/quant_utils.py)."""
        proj = prefix.split(".")[-1]
        if proj in self.packed and prefix in self._exact:
            return True
        if proj in self.packed:
            # Every occurrence of the fused name is replaced, as str.replace does there.
            shards = [prefix.replace(proj, shard) for shard in self.packed[proj]]
            states = {s: s in self._exact for s in shards}
            if len(set(states.values())) > 1:
                listed = [s for s, v in states.items() if v]
                raise PartlyExcludedFusedLayer(
                    f"{prefix}: the exclude list names {', '.join(listed)} but not every shard of the fused "
                    "layer; vLLM refuses to load ('Detected some but not all shards ... are quantized')"
                )
            return next(iter(states.values()))
        if "experts" in prefix:
            return any(prefix in e for e in self._expert_entries)
        return prefix in self._exact

    def excluded(self, prefix: str) -> bool:
        """Whether the list excludes the layer vLLM names ``prefix``.

        Raises:
            PartlyExcludedFusedLayer: the list names some but not all shards of a fused layer (vLLM refuses
                to load the checkpoint).
        """
        if not self.entries:
            return False
        if self._skipped(prefix):
            return True
        # Substring pass, skipping an entry equal to the prefix (the exact pass judged it). Stripping a
        # leading "language_model." there cannot add a match: a substring of the rest is one of the whole.
        if (
            self._substring
            and self._substring.search(prefix)
            and (prefix not in self._exact or any(e != prefix and e in prefix for e in self.entries))
        ):
            return True
        return bool(self._wildcard and self._wildcard.match(prefix))

    def quantizes(self, layer: ConsumerLayer) -> bool:
        """Whether vLLM builds this layer NVFP4 (``ModelOptQuantConfigBase.get_quant_method``).

        Raises:
            PartlyExcludedFusedLayer: as ``excluded``.
        """
        if not layer.asked:
            return False
        if self.excluded(layer.prefix):
            return False
        return not any(s in layer.prefix for s in _ALWAYS_UNQUANTIZED_SUBSTRINGS)


@dataclass(frozen=True)
class Disagreement:
    """A layer whose tensors say one thing and vLLM's reading of the exclude list another."""

    layer: ConsumerLayer
    tensors_quantized: bool | None  # None: members disagree among themselves
    vllm: str  # "NVFP4", "unquantized" or "refuses to load: ..."
    entries: tuple[str, ...] = ()  # the list's entries that exclude the layer, when vLLM excludes it

    def message(self, tensors: str = "") -> str:
        """One line naming the layer, what vLLM does with it and the fix; ``tensors`` says what its NVFP4 scales
        are when vLLM expects them (default: absent)."""
        lay = self.layer
        members = ", ".join(lay.members[:3]) + (f", ... ({len(lay.members)} modules)" if len(lay.members) > 3 else "")
        what = f"{lay.prefix}" + (f" (checkpoint {members})" if lay.members != (lay.prefix,) else "")
        if lay.kind == "lm_head" and not lay.members:
            what = f"{lay.prefix} (no tensor of its own: vLLM ties it to the bf16 embedding)"
            tensors = "never loaded"
        if self.vllm.startswith("refuses"):
            return f"{what}: vLLM {self.vllm}; list every shard or the fused name '{lay.checkpoint_name}'"
        if self.tensors_quantized:
            if not lay.asked:
                why, fix = "it is built without the quantization config", "leave it unquantized"
            elif self.entries:
                why = f"{', '.join(repr(e) for e in self.entries)} matches the name vLLM asks about"
                fix = "remove or narrow that entry"
            else:
                why = f"vLLM never quantizes names containing {' or '.join(_ALWAYS_UNQUANTIZED_SUBSTRINGS)}"
                fix = "leave it unquantized"
            return f"{what}: vLLM builds it unquantized ({why}) but its tensors are NVFP4; {fix}"
        held = tensors or "absent (the tensors are unquantized)"
        return (
            f"{what}: vLLM builds it NVFP4 (no exclude entry matches the name vLLM asks about) but its NVFP4 "
            f"scales are {held}; add '{lay.checkpoint_name}' to exclude_modules (and config.json's ignore)"
        )


def disagreements(
    layers: Iterable[ConsumerLayer], quantized: Callable[[str], bool], exclusion: VllmExclusion
) -> list[Disagreement]:
    """The layers where vLLM's decision differs from the tensors.

    Args:
        layers: the layers vLLM builds (``consumers.vllm.consumer_layers``).
        quantized: whether a checkpoint module (a layer's member) holds NVFP4 tensors.
        exclusion: the exclude list as vLLM reads it for this class.

    Returns:
        One ``Disagreement`` per such layer, in the order of ``layers``: vLLM quantizes it but the tensors are
        not NVFP4 or the other way round, its members disagree among themselves (``tensors_quantized`` None),
        or vLLM refuses the list for it (a partly excluded fused layer).
    """
    out = []
    for lay in layers:
        states = {quantized(m) for m in lay.members}
        held = False if not states else (states.pop() if len(states) == 1 else None)
        try:
            vllm_q = exclusion.quantizes(lay)
            verdict = "NVFP4" if vllm_q else "unquantized"
        except PartlyExcludedFusedLayer as e:
            out.append(Disagreement(lay, held, f"refuses to load: {e}"))
            continue
        if held is None or vllm_q != held:
            entries = _entries_excluding(exclusion, lay.prefix) if held and not vllm_q else ()
            out.append(Disagreement(lay, held, verdict, entries))
    return out


def _entries_excluding(exclusion: VllmExclusion, prefix: str) -> tuple[str, ...]:
    """The raw list entries that, each on its own, make vLLM exclude ``prefix`` (for messages)."""
    found = []
    for raw in exclusion.raw:
        one = VllmExclusion([raw], exclusion.family)
        one.packed = exclusion.packed
        try:
            if one.excluded(prefix):
                found.append(raw)
        except PartlyExcludedFusedLayer:
            found.append(raw)
    return tuple(found)


class ExclusionMatcher:
    """The exclude list read against checkpoint module names: exact, then substring, then fnmatch, as
    ``is_layer_excluded`` reads it for a name vLLM does not fuse or rename (used for reference lists given
    to ``--exclude_config`` and for compressed-tensors checkpoints).

    Unlike ``VllmExclusion``, an empty entry matches no name by substring (only the empty name, by fnmatch).
    """

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        self._substring = _any_substring(p for p in self.patterns if p)
        self._wildcard = _any_fnmatch(self.patterns)

    def __call__(self, module: str) -> bool:
        """Whether the list excludes checkpoint module ``module``."""
        return bool(
            (self._substring and self._substring.search(module)) or (self._wildcard and self._wildcard.match(module))
        )
