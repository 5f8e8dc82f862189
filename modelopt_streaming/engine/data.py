"""Calibration data: the token rows the engine runs, from what a user has.

- a safetensors file with one integer tensor ``input_ids`` [N, L], or a JSON Lines file whose records hold
  ``input_ids`` lists: each row is one sequence used exactly as given and in order (no padding, no BOS added);
- a text file (``.txt``) or JSON Lines with ``text`` (or ``messages``, rendered through the checkpoint's chat
  template), tokenized with the checkpoint's tokenizer and packed into rows of ``seq_len`` tokens: documents
  are concatenated as the tokenizer encodes them and the remainder that does not fill a row is dropped, so no
  position is ever padding (ModelOpt's max calibration counts pad positions too: ../shared/engine.md).

Every problem is a one-line UsageError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from modelopt_streaming.errors import CheckpointError, UsageError
from modelopt_streaming.source.index import shard_tensors
from modelopt_streaming.source.reader import TensorReader

_INTEGER_DTYPES = {"I64", "I32", "I16", "I8", "U8"}


@dataclass(frozen=True)
class CalibrationData:
    """The rows to run and what identifies them (a digest of the token ids, so a changed file is detected)."""

    input_ids: torch.Tensor  # int64 [N, L]
    source: str
    kind: str  # "tokens" or "text"

    @property
    def fingerprint(self) -> str:
        ids = self.input_ids.contiguous()
        digest = hashlib.sha256(json.dumps(list(ids.shape)).encode())
        digest.update(ids.numpy().tobytes())
        return digest.hexdigest()

    def as_dict(self) -> dict:
        n, length = self.input_ids.shape
        return {"source": self.source, "kind": self.kind, "rows": n, "seq_len": length, "sha256": self.fingerprint}


def load_calibration_data(
    path: str | Path,
    checkpoint_dir: Path,
    vocab_size: int,
    size: int | None = None,
    seq_len: int | None = None,
    trust_remote_code: bool = False,
) -> CalibrationData:
    """The calibration rows of ``path`` for the checkpoint at ``checkpoint_dir``.

    Args:
        path: a token file (safetensors ``input_ids``, JSON Lines ``input_ids``) or text (``.txt``, JSON Lines
            ``text``/``messages``).
        checkpoint_dir: the source checkpoint (its tokenizer and chat template, for text).
        vocab_size: ids must lie in [0, vocab_size).
        size: rows to use (the first ``size``); None: every row the data gives.
        seq_len: tokens per row for text (default 2048); for token files, the length the rows must have.

    Raises:
        UsageError: a missing, empty or ragged file, a wrong dtype, ids outside the vocabulary, fewer tokens
            than asked, or text data without a tokenizer.
    """
    spec = str(path)
    path = Path(path)
    if not path.exists() and _looks_like_dataset_id(spec):
        path = None
    elif not path.exists():
        raise UsageError(f"--calib_data {path}: not a file")
    if size is not None and size < 1:
        raise UsageError(f"--calib_size must be at least 1, not {size}")
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--calib_seq_len must be at least 1, not {seq_len}")
    if path is None or path.is_dir():
        records = _dataset_records(path or spec)
        path = path or spec  # named in every message below
        if all("input_ids" in r for r in records):
            ids, kind = _listed_rows(path, records), "tokens"
        else:
            texts = [_record_text(path, i, r, checkpoint_dir, trust_remote_code) for i, r in enumerate(records)]
            ids, kind = _packed(path, texts, checkpoint_dir, seq_len or 2048, size, trust_remote_code), "text"
    elif path.suffix == ".safetensors":
        ids, kind = _safetensors_rows(path), "tokens"
    elif path.suffix in (".jsonl", ".json"):
        records = _json_lines(path)
        if records and all("input_ids" in r for r in records):
            ids, kind = _listed_rows(path, records), "tokens"
        else:
            texts = [_record_text(path, i, r, checkpoint_dir, trust_remote_code) for i, r in enumerate(records)]
            ids, kind = _packed(path, texts, checkpoint_dir, seq_len or 2048, size, trust_remote_code), "text"
    else:
        text = path.read_text(encoding="utf-8")
        ids, kind = _packed(path, [text], checkpoint_dir, seq_len or 2048, size, trust_remote_code), "text"
    if ids.numel() == 0:
        raise UsageError(f"--calib_data {path}: no tokens")
    if kind == "tokens" and seq_len is not None and ids.shape[1] != seq_len:
        raise UsageError(
            f"--calib_data {path}: rows of {ids.shape[1]} tokens, --calib_seq_len {seq_len} "
            "(token rows are used as given)"
        )
    if size is not None:
        if ids.shape[0] < size:
            raise UsageError(
                f"--calib_data {path}: fewer tokens than asked: {ids.shape[0]} rows of {ids.shape[1]}, "
                f"--calib_size {size}"
            )
        ids = ids[:size]
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise UsageError(f"--calib_data {path}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return CalibrationData(ids.to(torch.int64).contiguous(), str(path), kind)


def _looks_like_dataset_id(spec: str) -> bool:
    """``org/name`` (optionally ``org/name:split``): a Hugging Face dataset id, not a path."""
    name = spec.split(":", 1)[0]
    return name.count("/") == 1 and not name.startswith((".", "/")) and all(name.split("/"))


def _dataset_records(source: str | Path) -> list[dict]:
    """The records of a Hugging Face dataset: a directory written by ``save_to_disk``, a directory of data files
    (``load_dataset(dir)``), or a dataset id already in the local cache (``org/name[:split]``), always read
    offline: this tool never downloads. The split is ``train`` (or the only one, or the one named)."""
    import os

    # Before datasets is imported: it reads these once.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"--calib_data {source}: a dataset needs the datasets library: pip install 'modelopt-streaming[calib]'"
        ) from None
    # Imported before us, datasets has read the environment already: its flag is set too.
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    if isinstance(source, Path):
        spec, split = str(source), ""
    else:
        spec, _, split = source.partition(":")
    saved = isinstance(source, Path) and any((source / f).is_file() for f in ("dataset_dict.json", "state.json"))
    try:
        data = datasets.load_from_disk(spec) if saved else datasets.load_dataset(spec, split=split or None)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"--calib_data {source}: not a dataset this tool can read offline ({reason}); a dataset id must be in "
            "the local cache already (this tool never downloads)"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split:
            data = data[split]
        elif "train" in data:
            data = data["train"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise UsageError(f"--calib_data {source}: splits {sorted(data)}; name one as {spec}:SPLIT")
    columns = set(data.column_names)
    if not columns & {"input_ids", "text", "messages"}:
        raise UsageError(f"--calib_data {source}: no input_ids, text or messages column (has {sorted(columns)})")
    records = [dict(r) for r in data]
    if not records:
        raise UsageError(f"--calib_data {source}: no records")
    return records


def _safetensors_rows(path: Path) -> torch.Tensor:
    try:
        tensors = shard_tensors(path.parent, path.name)
    except CheckpointError as e:
        raise UsageError(f"--calib_data {e}") from None
    if set(tensors) != {"input_ids"}:
        raise UsageError(
            f"--calib_data {path}: expected one tensor 'input_ids' [rows, tokens], found {sorted(tensors)[:4]}"
        )
    info = tensors["input_ids"]
    if info.dtype not in _INTEGER_DTYPES:
        raise UsageError(f"--calib_data {path}, tensor 'input_ids': dtype {info.dtype}, expected an integer type")
    if len(info.shape) != 2:
        raise UsageError(
            f"--calib_data {path}, tensor 'input_ids': shape {list(info.shape)}, expected [rows, tokens] (2-D)"
        )
    with TensorReader(path.parent) as reader:
        return reader.read(info).to(torch.int64)


def _json_lines(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--calib_data {path}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UsageError(f"--calib_data {path}, line {number}: expected a JSON object")
            records.append(record)
    if not records:
        raise UsageError(f"--calib_data {path}: no records")
    return records


def _listed_rows(path: Path, records: list[dict]) -> torch.Tensor:
    rows = [r["input_ids"] for r in records]
    for number, row in enumerate(rows, 1):
        if not isinstance(row, list) or not row or not all(isinstance(t, int) for t in row):
            raise UsageError(f"--calib_data {path}, record {number}: input_ids must be a non-empty list of integers")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise UsageError(
            f"--calib_data {path}: ragged rows ({min(lengths)} to {max(lengths)} tokens); token rows are used as "
            "given, so they must have one length"
        )
    return torch.tensor(rows, dtype=torch.int64)


def _tokenizer(path: Path, checkpoint_dir: Path, trust_remote_code: bool):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(
            f"--calib_data {path} is text, but {checkpoint_dir} has no tokenizer that loads ({type(e).__name__}); "
            "give token ids (a safetensors input_ids file) instead"
        ) from None


def _record_text(path: Path, number: int, record: dict, checkpoint_dir: Path, trust_remote_code: bool) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        tokenizer = _tokenizer(path, checkpoint_dir, trust_remote_code)
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"--calib_data {path}: records hold messages but {checkpoint_dir} has no chat template")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    raise UsageError(f"--calib_data {path}, record {number + 1}: no 'text', 'messages' or 'input_ids'")


def _packed(
    path: Path, texts: list[str], checkpoint_dir: Path, seq_len: int, size: int | None, trust_remote_code: bool
) -> torch.Tensor:
    tokenizer = _tokenizer(path, checkpoint_dir, trust_remote_code)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"]
        if size is not None and len(ids) >= size * seq_len:
            break
    rows = len(ids) // seq_len
    if rows == 0:
        raise UsageError(f"--calib_data {path}: {len(ids)} tokens, fewer than one row of --calib_seq_len {seq_len}")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.int64).reshape(rows, seq_len)
