"""SIGKILL mid-run, then --resume: the result equals an uninterrupted run; interrupted runs never leave a
half-written output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from bitsmith.cli.main import main


def _args(out, *extra):
    return ["quantize", str(shared_path("models", "aidreams260K")), "--method", "omniquant", "--epochs", "12",
            "--wbits", "3", "--group-size", "32", "--calib", str(shared_path("data", "aidreams260K-samples")),
            "--nsamples", "8", "--seqlen", "128", "-o", str(out), "-q", *extra]


def _blocks_done(partial) -> int:
    try:
        return json.loads((partial / "state.json").read_text())["blocks_done"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, caplog):
    out = tmp_path / "q"
    partial = tmp_path / "q.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BITSMITH_TEST_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith", *_args(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _blocks_done(partial) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = _blocks_done(partial)
    assert 1 <= done < 4
    assert not out.exists()  # never a half-written output folder

    assert main(_args(out)) == 2  # a leftover checkpoint is not silently discarded
    torch.set_num_threads(1)
    with caplog.at_level("INFO", logger="bitsmith"):
        assert main(_args(out, "--resume")) == 0
    assert f"resuming: {done} finished blocks restored" in caplog.text
    assert not partial.exists()
    ref = tmp_path / "ref"
    assert main(_args(ref)) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "bitsmith.json").read_text())["blocks"] for d in (out, ref))
    assert [x["loss_final"] for x in ra] == pytest.approx([x["loss_final"] for x in rb], rel=1e-6)


def test_checkpoint_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(_args(out, "--epochs", "1")) == 0
    # simulate a leftover checkpoint of a different run
    partial = tmp_path / "q2.partial"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"version": 1, "fingerprint": "other", "blocks_done": 2}))
    assert main(_args(tmp_path / "q2", "--epochs", "1", "--resume")) == 2
    assert "other settings" in capsys.readouterr().err
