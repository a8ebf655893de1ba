"""Export errors that need no optional dependency and no fixture."""

from __future__ import annotations

import sys

import pytest

from bitsmith.cli.main import main


def test_missing_library_is_one_line_error_with_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import raises ImportError
    rc = main(["export", str(tmp_path), "--format", "compressed-tensors", "--output", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and '.[export]' in err[0] and not (tmp_path / "o").exists()


def test_export_of_an_ordinary_folder_names_the_fix(tmp_path, capsys):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed: pip install -e '.[export]'")
    (tmp_path / "config.json").write_text("{}")
    rc = main(["export", str(tmp_path), "--format", "compressed-tensors", "--output", str(tmp_path / "o"), "-q"])
    assert rc == 2 and "bitsmith quantize" in capsys.readouterr().err
