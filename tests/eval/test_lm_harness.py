"""``bitsmith eval --tasks`` through lm-evaluation-harness, on a local task built from the aidreams260K samples.

The task: a 10-word context from a test sample, then its true 3-word continuation versus the same words with two
adjacent ones swapped (chance 0.5; the fp model gets ~0.96, so a few items are wrong and the comparison below is
item-sensitive). lm-eval's accuracy is checked against an independent transformers computation
of the same choice rule (higher summed log-likelihood of the continuation tokens). Everything runs offline.
Skipped without the optional ``lmeval`` extra (``pip install -e ".[lmeval]"``), except the missing-package error.
"""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from conftest import shared_path

from bitsmith.cli.main import main

TASK = "aidreams_swap"


def _items(text_file, n: int, seed: int = 0) -> list[dict]:
    rng, out = random.Random(seed), []
    for line in text_file.read_text(encoding="utf-8").splitlines():
        words = line.strip().strip('"').split()
        if len(words) < 13:
            continue
        true = words[10:13]
        swapped = list(true)
        i = rng.randrange(len(true) - 1)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        if swapped == true:
            continue
        label = rng.randrange(2)
        choices = [" ".join(true), " ".join(swapped)][:: 1 if label == 0 else -1]
        out.append({"context": " ".join(words[:10]), "choices": choices, "label": label})
        if len(out) == n:
            break
    return out


def _write_task(folder, items, dataset_path: str = "json") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    kwargs = (f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf-cache'}\n"
              if dataset_path == "json" else "")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: {dataset_path}\n{kwargs}test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """lm-eval + HF datasets, forced offline (also when datasets was imported before the env was set)."""
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed: pip install -e '.[lmeval]'")
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _reference_acc(model_dir: str, items: list[dict]) -> float:
    """lm-eval's multiple-choice rule with plain transformers: continuation ``" " + choice`` after the context,
    the tokenizer's default special tokens (a BOS here), tokens of ``tok(context + continuation)`` past
    ``tok(context)``, summed log-probabilities; the higher sum is the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for it in items:
        ctx = tok(it["context"])["input_ids"]
        scores = []
        for choice in it["choices"]:
            whole = tok(it["context"] + " " + choice)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].float(), -1)
            target = ids[0, len(ctx):]
            scores.append(float(logp[len(ctx) - 1:].gather(-1, target[:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return correct / len(items)


def _eval(model_dir: str, tasks_dir, out_json, *extra: str) -> dict:
    rc = main(["eval", model_dir, "--tasks", TASK, "--tasks-dir", str(tasks_dir), "--batch-size", "8",
               "--json", str(out_json), "-q", *extra])
    assert rc == 0
    body = json.loads(out_json.read_text())
    assert "ppl" not in body  # --tasks alone evaluates no perplexity
    return body["tasks"][TASK]


def test_local_task_fp_and_rtn_w4_match_reference(offline, tmp_path):
    model = str(shared_path("models", "aidreams260K"))
    samples = shared_path("data", "aidreams260K-samples")
    items = _items(samples / "test.txt", 80)
    _write_task(tmp_path / "tasks", items)

    fp = _eval(model, tmp_path / "tasks", tmp_path / "fp.json")
    assert fp["samples"] == len(items) and 0.0 <= fp["acc"] <= 1.0
    assert fp["acc"] >= 0.8  # chance is 0.5: the real model knows its word order
    assert fp["acc"] == pytest.approx(_reference_acc(model, items), abs=1e-9)

    q = tmp_path / "w4"
    assert main(["quantize", model, "--method", "rtn", "--wbits", "4", "--group-size", "32", "--calib",
                 str(samples), "--nsamples", "4", "--seqlen", "128", "-o", str(q), "-q"]) == 0
    w4 = _eval(str(q), tmp_path / "tasks", tmp_path / "w4.json", "--limit", "40")
    assert w4["samples"] == 40 and 0.0 <= w4["acc"] <= 1.0
    assert w4["acc"] == pytest.approx(_reference_acc(str(q), items[:40]), abs=1e-9)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("bitsmith: error: ")]
    assert len(err) == 1, err
    return err[0]


def test_task_data_unavailable_offline_is_one_line_error(offline, tmp_path, capsys):
    model = str(shared_path("models", "aidreams260K"))
    _write_task(tmp_path / "tasks", [], dataset_path="bitsmith-tests/not-downloadable")
    out = tmp_path / "never.json"
    assert main(["eval", model, "--tasks", TASK, "--tasks-dir", str(tmp_path / "tasks"), "--json", str(out),
                 "-q"]) == 2
    msg = _one_error_line(capsys)
    assert f"'{TASK}'" in msg and "data not available" in msg and "--tasks-dir" in msg
    assert not out.exists()


def test_unknown_task_name_is_named(offline, tmp_path):
    from lm_eval.tasks import TaskManager

    from bitsmith.eval.lm_harness import _load_tasks

    _write_task(tmp_path / "tasks", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task'.*--tasks-dir"):
        _load_tasks(manager, ["no_such_task"])


def test_missing_lm_eval_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    model = str(shared_path("models", "aidreams260K"))
    assert main(["eval", model, "--tasks", "hellaswag", "-q"]) == 2
    msg = _one_error_line(capsys)
    assert "lm-evaluation-harness" in msg and 'pip install -e ".[lmeval]"' in msg
