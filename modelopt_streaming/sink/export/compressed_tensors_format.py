"""compressed-tensors ``nvfp4-pack-quantized`` config (spec section 5), derived from the tensors written.

The schema is compressed-tensors' ``QuantizationConfig`` (compressed_tensors/quantization/quant_config.py:
``config_groups`` of ``QuantizationScheme``, ``quant_method``, ``format``, ``quantization_status``,
``ignore``, ``kv_cache_scheme``), the way llm-compressor writes NVFP4 (``NVFP4`` / ``NVFP4A16`` presets in
compressed_tensors/quantization/quant_scheme.py: weights tensor_group, group 16, symmetric, static;
activations the same but ``dynamic: "local"``).

How vLLM 0.32 reads ``ignore`` on this path differs from the ModelOpt path (paths under
``vllm/model_executor/layers/quantization/``):

* ``compressed_tensors/utils.py`` ``should_ignore_layer`` -> ``utils/config_utils.py``
  ``find_matching_patterns`` / ``is_equal_or_regex_match``: an entry matches a layer name only when equal
  or, with a ``re:`` prefix, by ``re.match``; no substring and no fnmatch (``use_fnmatch`` is False there).
* A fused layer (``qkv_proj``, ``gate_up_proj``, ``fused_qkv_a_proj``: the class's
  ``packed_modules_mapping``) is ignored when an entry names it, else when every shard name matches; some
  but not all shards raises "Found different quantization schemes for the shards".
* ``compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py`` ``get_moe_method`` asks about
  ``{experts}.0.{gate,up,down}_proj`` (the checkpoint names of expert 0) and needs one answer for all three.
* Layers are renamed by the class's ``hf_to_vllm_mapper`` on both sides (``CompressedTensorsConfig
  .apply_vllm_mapper`` maps every entry containing a dot), so checkpoint names stay valid.
* ``lm_head`` (``ParallelLMHead``) and embeddings match no ``Linear`` target, so they stay unquantized
  whatever the list says; ``lm_head`` is listed anyway, as llm-compressor lists it.

So the list here names every unquantized Linear module exactly, by its checkpoint name: exact under those
rules whatever the architecture, and the same reading transformers' compressed-tensors integration uses
(``compressed_tensors.utils.match``: exact name or ``re:``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from modelopt_streaming.consumers import GENERIC, consumer_layers, family_of
from modelopt_streaming.errors import ConsumerError
from modelopt_streaming.formats.names import is_embedding

QUANT_METHOD = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"


def _fp4_args(dynamic: bool | str) -> dict:
    return {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "symmetric": True,
        "dynamic": dynamic,
        "group_size": 16,
    }


def compressed_tensors_ignore(
    unquantized: Iterable[str], linear_modules: Iterable[str], config: dict | None = None
) -> list[str]:
    """Exact names of the unquantized Linear modules (embeddings left out: vLLM and transformers build
    them unquantized whatever the list says), and the ``lm_head`` vLLM builds even when tied.

    Raises ConsumerError where vLLM would build one layer from quantized and unquantized members."""
    unquantized = set(unquantized)
    linear_modules = set(linear_modules)
    quantized = linear_modules - unquantized
    family = family_of(config) or GENERIC
    entries = {m for m in unquantized if not is_embedding(m)}
    for layer in consumer_layers(linear_modules, config, family):
        states = {m in quantized for m in layer.members}
        if len(states) > 1:
            raise ConsumerError(
                f"{layer.prefix}: vLLM builds {', '.join(layer.members)} as one layer, but only some are quantized"
            )
        if layer.kind == "lm_head" and not (states and states.pop()):
            entries.add(layer.checkpoint_name)
    return sorted(entries)


def quantization_config(ignore: list[str], weight_only: bool) -> dict:
    group = {
        "targets": ["Linear"],
        "weights": _fp4_args(False),
        "input_activations": None if weight_only else _fp4_args("local"),
        "output_activations": None,
        "format": FORMAT,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def model_config(source_config: dict, ignore: list[str], weight_only: bool) -> dict:
    """The source config.json with its ``quantization_config`` replaced (a stale one must not survive)."""
    config = copy.deepcopy(source_config)
    config["quantization_config"] = quantization_config(ignore, weight_only)
    for key in ("text_config", "language_config"):
        if isinstance(config.get(key), dict):
            config[key].pop("quantization_config", None)
    return config
