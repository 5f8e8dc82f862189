"""The vLLM oracle (asked_layers.py) as one long-lived process under vLLM's interpreter, shared by every
test of the session: vLLM's import and start-up (~10 s on two cores) are paid once."""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from safetensors import safe_open

ORACLE = Path(__file__).parent / "asked_layers.py"
_SERVERS: dict[str, VllmOracle] = {}
_EXPERTS_3D = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)$")


class VllmOracle:
    def __init__(self, python: Path, torchvision_stub: bool = False):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-oracle-", suffix=".log", delete=False)  # noqa: SIM115
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tempfile.gettempdir(),
            # Tests never download, nor report usage.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if torchvision_stub:  # Llama-4's class imports torchvision (see stubs/torchvision)
            env["PYTHONPATH"] = str(Path(__file__).parent / "stubs")
        self.proc = subprocess.Popen(
            [str(python), str(ORACLE), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def layers(self, directories: list[Path]) -> dict[str, dict]:
        """For each checkpoint directory: what vLLM builds and how its quant config answers (asked_layers.py)."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps([str(d) for d in directories]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"the vLLM oracle exited ({self.proc.wait()}): {self.log.read()[-4000:]}")
        answers = json.loads(line)
        return {str(d): answers[str(d)] for d in directories}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()
        os.unlink(self.log.name)


def oracle(python: Path, torchvision_stub: bool = False) -> VllmOracle:
    """The session's oracle process for this interpreter, started on first use."""
    key = f"{python}:{torchvision_stub}"
    if key not in _SERVERS:
        _SERVERS[key] = VllmOracle(python, torchvision_stub)
        atexit.register(_SERVERS[key].close)
    return _SERVERS[key]


# -- reading the answers and our files, independently of modelopt_streaming's code -------------------


def tensor_names(directory: Path) -> dict[str, tuple[int, ...]]:
    names = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                names[k] = tuple(sf.get_slice(k).get_shape())
    return names


def layer_weights(prefix: str, answer: dict, names: dict) -> list[str]:
    """The checkpoint weights vLLM loads into the layer ``prefix``: by vLLM's own renaming of each tensor
    name, under the prefix itself or, for a fused layer, under one of its shards."""
    leaf = prefix.rsplit(".", 1)[-1]
    packed = answer["packed_modules_mapping"]
    roots = [prefix] + [prefix.replace(leaf, shard) for shard in packed.get(leaf, [])]
    mapped = answer["mapped_names"]
    return [
        t
        for t in names
        if (t.endswith(".weight") or _EXPERTS_3D.search(t)) and any(mapped.get(t, t).startswith(r + ".") for r in roots)
    ]


def is_nvfp4(weight: str, names: dict) -> bool:
    scale = weight + "_scale" if weight.endswith(".weight") else weight + "_weight_scale"
    return scale in names


# The methods ModelOptNvFp4Config.get_quant_method returns for weight layers.
QUANTIZED_METHODS = {"ModelOptLinearMethod", "MoEMethodMarker"}
WEIGHT_LAYERS_UNQUANTIZED = {"UnquantizedLinearMethod", "NoneType"}


def vllm_decisions(answer: dict) -> dict[str, str]:
    """prefix -> "nvfp4" / "unquantized" / "refused", for the weight layers vLLM asked about."""
    out = {}
    for entry in answer["layers"]:
        if "Attention" in entry["layer"] or entry["layer"] == "VocabParallelEmbedding":
            continue  # KV-cache method / embeddings: no NVFP4 weights either way
        method = entry["method"]
        out[entry["prefix"]] = (
            "refused" if method == "refused" else "nvfp4" if method in QUANTIZED_METHODS else "unquantized"
        )
        assert method in QUANTIZED_METHODS | WEIGHT_LAYERS_UNQUANTIZED | {"refused"}, entry
    return out


def tensor_decisions(answer: dict, directory: Path, names: dict | None = None) -> dict[str, str]:
    """prefix -> what our files hold for that layer ("absent": no tensor at all); ``names`` (tensor name ->
    shape) stands in for the files of a checkpoint that exists only as a config."""
    names = tensor_names(directory) if names is None else names
    out = {}
    for prefix in vllm_decisions(answer):
        weights = layer_weights(prefix, answer, names)
        states = {is_nvfp4(w, names) for w in weights}
        if not weights:
            # A tied lm_head has no tensor: vLLM serves it from the bf16 embedding.
            out[prefix] = "unquantized" if prefix.endswith("lm_head") else "absent"
        else:
            out[prefix] = "mixed" if len(states) > 1 else "nvfp4" if states.pop() else "unquantized"
    return out


def disagreements(
    answer: dict, directory: Path, absent_ok: tuple[str, ...] = (), names: dict | None = None
) -> list[str]:
    """Layers where vLLM's decision differs from our tensors; a layer vLLM builds with no tensor at all is a
    disagreement too, unless its prefix starts with one of ``absent_ok``."""
    vllm, held = vllm_decisions(answer), tensor_decisions(answer, directory, names)
    return [
        f"{prefix}: vLLM {decision}, tensors {held[prefix]}"
        for prefix, decision in vllm.items()
        if decision != held[prefix] and not (held[prefix] == "absent" and prefix.startswith(absent_ok))
    ]
