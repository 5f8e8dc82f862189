"""A safetensors header's JSON, parsed as the safetensors library parses it: with serde_json, into the serde
derives of ``HashMetadata`` and ``TensorInfo`` (huggingface/safetensors, safetensors/src/tensor.rs).

Python's json accepts a little more than serde_json: NaN and Infinity, -0 as an integer, repeated keys (it
keeps the last; serde refuses a repeated struct field), lone surrogate escapes (serde_json never makes such a
Rust String) and any nesting depth (serde_json stops at 128 levels). The hooks and walks that catch those are
slow on a large header, so they run only where the text can hold one. ``index.read_header`` checks the rest.
"""

from __future__ import annotations

import json
from collections import Counter

__all__ = ["ENTRY_FIELDS", "parse_header_json"]

ENTRY_FIELDS = ("dtype", "shape", "data_offsets")  # tensor.rs TensorInfo, in declaration order
_MAX_DEPTH = 127  # serde_json refuses a 128th level of nested arrays or objects ("recursion limit exceeded")


class _JsonObject(dict):
    """A JSON object that remembers its repeated keys."""

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        self.repeated = (
            {k for k, n in Counter(k for k, _ in pairs).items() if n > 1} if len(self) < len(pairs) else set()
        )


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _json_int(text: str) -> int | float:
    # serde_json reads -0 as the float -0.0, which no usize field takes; Python's json makes it the int 0.
    return -0.0 if text == "-0" else int(text)


def _json_problem(values: list[tuple[object, int]]) -> str | None:
    """What serde_json refuses in these ``(value, its nesting depth)``: nesting too deep, a lone surrogate."""
    stack = list(values)
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > _MAX_DEPTH:
                return f"nested more than {_MAX_DEPTH} levels deep (serde_json's recursion limit)"
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack += [(item, depth + 1) for item in items]
        elif isinstance(v, str) and not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone UTF-16 surrogate escape"
    return None


def parse_header_json(text: str) -> object:
    """The header's JSON value, or the refusal serde would give.

    Args:
        text: the header, decoded from UTF-8.

    Returns:
        The parsed value (its shape is checked by the caller: an object of tensor entries).

    Raises:
        ValueError: ``(message, tensor name or None)`` for what serde_json or serde's derives refuse: invalid JSON
            by serde_json's grammar, ``__metadata__`` twice, or a field of a tensor entry twice.
    """
    hooks = {"parse_constant": _not_json} | ({"parse_int": _json_int} if "-0" in text else {})
    try:
        header = json.loads(text, **hooks)
        entry_dicts = (
            sum(isinstance(e, dict) for k, e in header.items() if k != "__metadata__")
            if isinstance(header, dict)
            else 0
        )
        # Without a backslash no field name is spelled with an escape and no surrogate exists, and each entry's
        # fields, once each, account for every occurrence of their names; otherwise the slow, exact parse.
        plain = (
            "\\" not in text
            and text.count('"__metadata__"') <= 1
            and sum(text.count(f'"{k}"') for k in ENTRY_FIELDS) == len(ENTRY_FIELDS) * entry_dicts
        )
        if not plain:
            header = json.loads(text, object_pairs_hook=_JsonObject, **hooks)
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"header is not valid JSON ({e})", None) from None
    if plain and isinstance(header, dict):
        # The fields read_header checks are flat; deep nesting can only hide in a tensor entry's other fields.
        extra = [(v, 3) for e in header.values() if isinstance(e, dict) for k, v in e.items() if k not in ENTRY_FIELDS]
        problem = _json_problem(extra)
    else:
        problem = _json_problem([(header, 1)])
    if problem:
        raise ValueError(f"header is not valid JSON ({problem})", None)
    if isinstance(header, _JsonObject):
        if "__metadata__" in header.repeated:
            raise ValueError("header has two __metadata__ entries", None)
        for name, entry in header.items():
            if isinstance(entry, _JsonObject) and entry.repeated & set(ENTRY_FIELDS):
                raise ValueError(f"header entry repeats {sorted(entry.repeated & set(ENTRY_FIELDS))[0]}", name)
    return header
