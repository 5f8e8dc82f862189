"""Calibration data as users bring it, and every way it can be wrong: each a one-line UsageError naming the
file, before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from modelopt_streaming.engine.data import load_calibration_data
from modelopt_streaming.errors import UsageError

WORDS = [f"w{i}" for i in range(200)]


def save_tokenizer(directory, chat_template: str | None = None) -> None:
    """A word-level tokenizer over WORDS (ids 0..201), saved as a checkpoint ships it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)


def test_token_rows_are_used_exactly_as_given(tmp_path):
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    save_file({"input_ids": ids}, tmp_path / "rows.safetensors")
    data = load_calibration_data(tmp_path / "rows.safetensors", tmp_path, vocab_size=256, size=3)
    assert torch.equal(data.input_ids, ids[:3].long()) and data.kind == "tokens"
    again = load_calibration_data(tmp_path / "rows.safetensors", tmp_path, vocab_size=256, size=3)
    assert again.fingerprint == data.fingerprint
    other = load_calibration_data(tmp_path / "rows.safetensors", tmp_path, vocab_size=256, size=4)
    assert other.fingerprint != data.fingerprint


def test_json_lines_of_token_ids(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": [i, i + 1, i + 2]}) for i in range(4)))
    data = load_calibration_data(path, tmp_path, vocab_size=256)
    assert data.input_ids.tolist() == [[i, i + 1, i + 2] for i in range(4)]


def test_text_is_packed_into_full_rows_without_padding(tmp_path):
    save_tokenizer(tmp_path)
    text = " ".join(WORDS[i % 200] for i in range(105))
    (tmp_path / "data.txt").write_text(text)
    data = load_calibration_data(tmp_path / "data.txt", tmp_path, vocab_size=256, seq_len=10)
    expected = torch.tensor([(i % 200) + 2 for i in range(100)]).reshape(10, 10)
    assert torch.equal(data.input_ids, expected) and data.kind == "text"


def test_chat_messages_go_through_the_chat_template(tmp_path):
    save_tokenizer(tmp_path, chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]})
    )
    data = load_calibration_data(path, tmp_path, vocab_size=256, seq_len=4)
    assert data.input_ids.tolist() == [[3, 4, 5, 6]]


def _bad_cases(tmp_path):
    def rows(name, tensors):
        save_file(tensors, tmp_path / name)
        return tmp_path / name

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "ragged.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2]}\n')
    (tmp_path / "text.txt").write_text("w1 w2 w3")
    return {
        "empty": (tmp_path / "empty.jsonl", {}, "no records"),
        "ragged": (tmp_path / "ragged.jsonl", {}, "ragged rows"),
        "zero rows": (rows("zero.safetensors", {"input_ids": torch.zeros(0, 8, dtype=torch.int64)}), {}, "no tokens"),
        "wrong dtype": (rows("float.safetensors", {"input_ids": torch.zeros(2, 8)}), {}, "expected an integer type"),
        "1-D": (rows("flat.safetensors", {"input_ids": torch.zeros(8, dtype=torch.int64)}), {}, r"expected \[rows"),
        "two tensors": (
            rows("two.safetensors", {"input_ids": torch.zeros(2, 8, dtype=torch.int64), "x": torch.zeros(1)}),
            {},
            "expected one tensor",
        ),
        "outside the vocabulary": (
            rows("big.safetensors", {"input_ids": torch.full((2, 8), 300, dtype=torch.int64)}),
            {},
            "token id 300 is outside the vocabulary",
        ),
        "fewer than asked": (
            rows("few.safetensors", {"input_ids": torch.zeros(2, 8, dtype=torch.int64)}),
            {"size": 3},
            "fewer tokens than asked",
        ),
        "no tokenizer": (tmp_path / "text.txt", {}, "has no tokenizer"),
        "missing": (tmp_path / "nothing.safetensors", {}, "not a file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "ragged",
        "zero rows",
        "wrong dtype",
        "1-D",
        "two tensors",
        "outside the vocabulary",
        "fewer than asked",
        "no tokenizer",
        "missing",
    ],
)
def test_bad_calibration_data_is_one_line_naming_the_file(tmp_path, case):
    path, kwargs, message = _bad_cases(tmp_path)[case]
    with pytest.raises(UsageError, match=message) as e:
        load_calibration_data(path, tmp_path, vocab_size=256, **kwargs)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_hugging_face_dataset_directories(tmp_path):
    """A dataset saved with ``save_to_disk`` (a DatasetDict, its train split) and a directory of data files."""
    import datasets

    save_tokenizer(tmp_path)
    text = " ".join(WORDS[i % 200] for i in range(50))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [text, text]})}).save_to_disk(str(saved))
    data = load_calibration_data(saved, tmp_path, vocab_size=256, seq_len=25)
    assert data.input_ids.shape == (4, 25) and data.input_ids[0, 0] == 2
    files = tmp_path / "files"
    files.mkdir()
    (files / "part.jsonl").write_text(
        json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"input_ids": [8, 9, 10]})
    )
    assert load_calibration_data(files, tmp_path, vocab_size=256).input_ids.tolist() == [[5, 6, 7], [8, 9, 10]]


def test_a_dataset_id_not_in_the_cache_is_refused_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(UsageError, match="never downloads") as e:
        load_calibration_data("someone/not-cached", tmp_path, vocab_size=256)
    assert "someone/not-cached" in str(e.value) and "\n" not in str(e.value)
