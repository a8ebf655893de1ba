"""bitsmith.data: sources resolve as documented, streams and windows are exact, every user mistake is a DataError."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path

from bitsmith.data import (
    DataError,
    calibration_samples,
    eval_token_limit,
    eval_windows,
    load_tokens,
    resolve_source,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", "aidreams260K"))


def _jsonl_ids(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _is_substring(window: torch.Tensor, stream: torch.Tensor) -> bool:
    views = stream.unfold(0, window.numel(), 1)
    return bool((views == window).all(dim=1).any())


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError


# ---- resolution ------------------------------------------------------------------------------------------
def test_named_dataset_resolves_under_data_dir_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    data = shared_path("data")
    src = resolve_source("wikitext2", "test", data)
    assert src.path == data / "wikitext2" / "test.txt" and src.kind == "text" and src.split == "test"
    assert src.rule.separator == "\n\n"
    monkeypatch.setenv("BITSMITH_DATA_DIR", str(data))
    src = resolve_source("PTB", "validation", None)
    assert src.path == data / "ptb" / "valid.txt" and src.split == "valid" and src.rule.separator == " "


def test_directory_picks_split_and_prefers_jsonl() -> None:
    folder = shared_path("data", "aidreams260K-samples")
    src = resolve_source(folder, "test")
    assert src.path == folder / "test.jsonl" and src.kind == "jsonl"
    valid = load_tokens(folder, "valid")
    test = load_tokens(str(folder), "test")
    assert valid.tolist() == [t for line in _jsonl_ids(folder / "valid.jsonl") for t in line]
    assert not torch.equal(valid, test)


@pytest.mark.parametrize("kind", ["named", "directory"])
def test_train_falls_back_to_valid_with_warning(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    data = shared_path("data")
    source, path = ("wikitext2", data / "wikitext2" / "valid.txt") if kind == "named" else (
        data / "aidreams260K-samples", data / "aidreams260K-samples" / "valid.jsonl")
    with caplog.at_level(logging.WARNING, logger="bitsmith.data"):
        src = resolve_source(source, "train", data)
    assert src.path == path and src.split == "valid"
    assert "no 'train' split" in caplog.text and "using 'valid'" in caplog.text


# ---- token streams -----------------------------------------------------------------------------------------
def test_pretokenized_stream_is_lines_concatenated() -> None:
    path = shared_path("data", "stories260K-samples", "test.jsonl")
    tokens = load_tokens(path, "test")
    assert tokens.dtype == torch.long and tokens.shape == (200 * 128,)
    assert tokens.tolist() == [t for line in _jsonl_ids(path) for t in line]
    assert load_tokens(path, "test", max_tokens=300).tolist() == tokens[:300].tolist()


def test_text_file_joined_with_blank_line_and_tokenized_once(tokenizer, tmp_path: Path) -> None:
    lines = ["Once upon a time", "", " pixels unfolding like petals."]
    path = tmp_path / "doc.txt"
    path.write_text("\n".join(lines) + "\n")
    expected = tokenizer("\n\n".join(lines)).input_ids
    assert load_tokens(path, "test", tokenizer).tolist() == expected
    assert expected[0] == tokenizer.bos_token_id and expected.count(tokenizer.bos_token_id) == 1


def test_join_rules_come_from_the_dataset_table(tokenizer, tmp_path: Path) -> None:
    docs = ["the cat sat", "on the mat", "and slept"]
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "test.txt").write_text("\n".join(docs) + "\n")
    assert load_tokens("ptb", "test", tokenizer, tmp_path).tolist() == tokenizer(" ".join(docs)).input_ids
    (tmp_path / "c4").mkdir()
    _write_jsonl(tmp_path / "c4" / "test.jsonl", [{"text": d} for d in docs])
    assert load_tokens("c4", "test", tokenizer, tmp_path).tolist() == tokenizer(" ".join(docs)).input_ids
    assert eval_token_limit("c4", 128) == 256 * 128 and eval_token_limit("wikitext2", 128) is None


# ---- calibration -------------------------------------------------------------------------------------------
def test_calibration_from_text_is_seeded_substrings(tokenizer) -> None:
    path = shared_path("data", "aidreams260K-samples", "valid.txt")
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = calibration_samples(path, tokenizer, nsamples=6, seqlen=64, seed=3)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_samples(path, tokenizer, 6, 64, seed=3))
    assert not torch.equal(a, calibration_samples(path, tokenizer, 6, 64, seed=4))
    assert 0 <= int(a.min()) and int(a.max()) < len(tokenizer)
    stream = load_tokens(path, "valid", tokenizer)
    assert all(_is_substring(row, stream) for row in a)


def test_calibration_from_pretokenized_lines_starts_at_bos() -> None:
    folder = shared_path("data", "aidreams260K-samples")
    lines = _jsonl_ids(folder / "valid.jsonl")
    a = calibration_samples(folder, None, nsamples=8, seqlen=128, seed=0)  # split train -> valid
    assert a.shape == (8, 128) and (a[:, 0] == 1).all()
    rows = [row.tolist() for row in a]
    assert all(r in lines for r in rows) and len({tuple(r) for r in rows}) == 8  # whole lines, no repeats
    short = calibration_samples(folder, None, nsamples=3, seqlen=32, seed=0, split="valid")
    assert all(row.tolist() in [line[:32] for line in lines] for row in short)
    assert not torch.equal(a, calibration_samples(folder, None, 8, 128, seed=1))


def test_calibration_ragged_pretokenized_uses_the_stream(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "r.jsonl", [{"input_ids": list(range(i * 10, i * 10 + 7))} for i in range(5)])
    a = calibration_samples(path, None, nsamples=4, seqlen=10, seed=0)
    stream = load_tokens(path, "train")
    assert a.shape == (4, 10) and all(_is_substring(row, stream) for row in a)


# ---- evaluation windows -----------------------------------------------------------------------------------
def test_eval_windows_drop_tail_and_honour_limit() -> None:
    tokens = torch.arange(25)
    w = eval_windows(tokens, 4)
    assert w.shape == (6, 4) and w[1].tolist() == [4, 5, 6, 7] and int(w[-1, -1]) == 23
    assert eval_windows(tokens, 4, limit=2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DataError, match="need ≥ 30, have 25"):
        eval_windows(tokens, 30)
    with pytest.raises(DataError, match="1-D"):
        eval_windows(tokens.view(5, 5), 2)


# ---- errors ------------------------------------------------------------------------------------------------
def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a known dataset \(wikitext2, ptb, c4\).*does not exist"):
        load_tokens(tmp_path / "nope.txt", "test")
    with pytest.raises(DataError, match="wikitext3"):
        load_tokens("wikitext3", "test")


def test_named_dataset_not_on_disk_lists_paths_tried(tokenizer, tmp_path: Path, no_hub) -> None:
    with pytest.raises(DataError) as err:
        load_tokens("wikitext2", "train", tokenizer, tmp_path)
    msg = str(err.value)
    for split in ("train", "valid"):
        for ext in ("jsonl", "txt"):
            assert str(tmp_path / "wikitext2" / f"{split}.{ext}") in msg
    assert "BITSMITH_DATA_DIR" in msg and "pip install datasets" in msg and "\n" not in msg


def test_directory_without_split_and_bad_split(tmp_path: Path) -> None:
    (tmp_path / "valid.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"no 'test' split: tried .*test\.jsonl"):
        resolve_source(tmp_path, "test")
    with pytest.raises(DataError, match="unknown split 'dev2'"):
        resolve_source(tmp_path, "dev2")
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        resolve_source(tmp_path / "a.csv", "test")


def test_text_without_tokenizer(tmp_path: Path, no_hub) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "hello"}])
    for source in (tmp_path / "a.txt", tmp_path / "b.jsonl", "wikitext2"):
        with pytest.raises(DataError, match="is text and the model has no tokenizer; use a pre-tokenized .jsonl"):
            load_tokens(source, "test", None, tmp_path)


@pytest.mark.parametrize(("line", "match"), [
    ('{"ids": [1, 2]}', r"line 2 has neither 'text' nor 'input_ids' \(keys: ids\)"),
    ('{"input_ids": [1, 2', "line 2 is not valid JSON"),
    ('[1, 2]', "line 2 is a JSON list, not an object"),
    ('{"input_ids": ["a"]}', "line 2: 'input_ids' must be a non-empty list"),
    ('{"text": "hi"}', "line 2 has 'text' but earlier lines have the other key"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [1, 2, 3]}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as err:
        load_tokens(path, "test")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "blank.txt"])
def test_empty_file(tmp_path: Path, tokenizer, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n \n" if name.startswith("blank") else "")
    with pytest.raises(DataError, match=f"{path} is empty"):
        load_tokens(path, "test", tokenizer)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_file(tmp_path: Path, tokenizer, suffix: str) -> None:
    path = tmp_path / f"bin{suffix}"
    path.write_bytes(b'{"text": "ok"}\n' + b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=f"{path} line 2 is not valid UTF-8"):
        load_tokens(path, "test", tokenizer)


def test_not_enough_calibration_tokens(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "s.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    with pytest.raises(DataError, match=r"not enough calibration tokens: need ≥ seqlen\+1 = 6, have 5"):
        calibration_samples(path, None, nsamples=2, seqlen=5)
    with pytest.raises(DataError, match="nsamples must be a positive integer"):
        calibration_samples(path, None, nsamples=0, seqlen=2)
