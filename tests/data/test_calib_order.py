"""Calibration order 'file' (``--calib-order file``): the first lines / windows in file order, no randomness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitsmith.cli.main import build_parser, config_from_args
from bitsmith.config import QuantConfig
from bitsmith.data import DataError, calibration_samples


def _write_jsonl(path: Path, rows: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def test_file_order_takes_the_first_lines_cut_to_seqlen(tmp_path: Path) -> None:
    rows = [[100 * i + j for j in range(12)] for i in range(6)]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    got = calibration_samples(path, None, nsamples=4, seqlen=10, order="file")
    assert torch.equal(got, torch.tensor([r[:10] for r in rows[:4]]))
    assert torch.equal(got, calibration_samples(path, None, 4, 10, seed=7, order="file"))  # seed plays no part
    assert not torch.equal(got, calibration_samples(path, None, 4, 10, seed=0))  # the default still shuffles
    with pytest.raises(DataError, match="has 6 lines but calibration order 'file' takes the first 7"):
        calibration_samples(path, None, nsamples=7, seqlen=10, order="file")


def test_file_order_on_a_stream_takes_consecutive_windows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "r.jsonl", [list(range(i * 7, i * 7 + 7)) for i in range(5)])  # ragged: 35 ids
    assert calibration_samples(path, None, 3, 10, order="file").tolist() == [list(range(k * 10, k * 10 + 10))
                                                                             for k in range(3)]
    with pytest.raises(DataError, match="not enough calibration tokens"):
        calibration_samples(path, None, 4, 10, order="file")
    with pytest.raises(DataError, match="unknown calibration order"):
        calibration_samples(path, None, 3, 10, order="sorted")


def test_calib_order_flag_reaches_the_recipe() -> None:
    args = build_parser().parse_args(["quantize", "M", "-o", "O", "--calib-order", "file"])
    config = config_from_args(args)
    assert config.calib_order == "file" and QuantConfig.from_dict(config.to_dict()) == config
    assert config_from_args(build_parser().parse_args(["quantize", "M", "-o", "O"])).calib_order == "random"
    with pytest.raises(ValueError, match="unknown calib_order"):
        QuantConfig(weight=config.weight, calib_order="sorted")
