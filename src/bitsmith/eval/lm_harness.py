"""Zero-/few-shot task accuracy through EleutherAI's lm-evaluation-harness (``pip install -e ".[lmeval]"``).

:func:`evaluate_tasks` wraps an already prepared model (weights quantized, activation / KV-cache quantization
re-applied, as ``bitsmith eval`` does) in lm-eval's ``HFLM`` and runs ``lm_eval.simple_evaluate`` on it. lm-eval is
imported only here and only when called.

Task data: lm-eval's built-in tasks (``hellaswag``, ``arc_easy``, …) read their data with Hugging Face ``datasets``;
on a machine without internet the data must already be in the local datasets cache (``HF_DATASETS_CACHE``; set
``HF_DATASETS_OFFLINE=1`` to fail fast instead of waiting on the network), or the task must be a custom task YAML
over local files in ``tasks_dir`` (lm-eval's ``--include_path``), e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: /abs/path/items.jsonl}}``. Otherwise a one-line ``ValueError`` names the task.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[lmeval]" (or pip install "lm_eval[hf]>=0.4")'
DATA_HINT = ("its data must be in the local Hugging Face datasets cache (HF_DATASETS_CACHE), or pass --tasks-dir "
             "DIR with a task YAML over local data files")


def require_lm_eval() -> tuple[Any, Any, Any]:
    """``(lm_eval, HFLM, TaskManager)``; a one-line ValueError with the pip command when lm-eval is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"task evaluation needs lm-evaluation-harness ({e.name or e} is missing); {INSTALL_HINT}") \
            from None
    return lm_eval, HFLM, TaskManager


def _task_manager(TaskManager, names: Sequence[str], tasks_dir: str | Path | None):
    """lm-eval's TaskManager. With ``tasks_dir`` whose YAMLs define every requested name, the built-in index
    (~15k tasks, several seconds to scan) is skipped; otherwise both are searched, ``tasks_dir`` taking precedence."""
    if tasks_dir is None:
        return TaskManager()
    folder = Path(tasks_dir)
    if not folder.is_dir():
        raise DataError(f"tasks folder {folder} does not exist; pass a folder holding lm-eval task YAML files")
    local = TaskManager(include_path=str(folder), include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    return TaskManager(include_path=str(folder))


def _load_tasks(manager, names: Sequence[str]) -> list[Any]:
    """The top-level Task / Group objects of each requested name (data loaded now, so errors name the task)."""
    from datasets.exceptions import DatasetsError

    objects: list[Any] = []
    for name in names:
        try:
            loaded = manager.load([name])
        except KeyError:
            raise ConfigError(f"unknown lm-eval task {name!r}; check the name (lm-eval ls tasks) or pass --tasks-dir "
                             "DIR holding its YAML") from None
        except (OSError, DatasetsError) as e:  # offline hub, missing local files, broken data
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"lm-eval task {name!r}: data not available ({reason}); {DATA_HINT}") from None
        groups = loaded.get("groups") or {}
        children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
        tops = [g for n, g in groups.items() if n not in children]
        objects.extend(tops or loaded["tasks"].values())
    return objects


def _clean(results: dict[str, Any], n_samples: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}``: numeric entries only, lm-eval's ``",none"`` filter suffix dropped, plus the
    number of evaluated examples as ``samples``."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {k.removesuffix(",none"): float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}
        if task in n_samples:
            row["samples"] = float(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        out[task] = row
    return out


def evaluate_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *, num_fewshot: int | None = None,
                   limit: int | None = None, batch_size: int = 1, tasks_dir: str | Path | None = None,
                   device: torch.device | str | None = None, bootstrap_iters: int = 100_000,
                   ) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on a causal LM; returns ``{task: {metric: value}}`` (e.g. ``{"arc_easy": {"acc": 0.41,
    "acc_stderr": 0.01, "acc_norm": …, "samples": 2376.0}}``).

    ``model`` is a Hugging Face causal LM (with any bitsmith activation / KV-cache quantization already applied);
    it is moved to ``device`` when given. ``num_fewshot`` overrides each task's default (``None``: the task's own,
    0 when it has none); ``limit`` evaluates only the first N examples of each task. Raises a one-line
    ``ValueError`` when lm-eval is missing, the model has no tokenizer, a task is unknown or its data unavailable.
    """
    if not tasks:
        raise ConfigError("--tasks needs at least one lm-eval task name")
    if tokenizer is None:
        raise ConfigError("lm-eval tasks are text: the model folder has no tokenizer; add one (tokenizer.json) or "
                         "evaluate perplexity on pre-tokenized .jsonl data instead")
    for key, value in (("num_fewshot", num_fewshot), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or value < (0 if key == "num_fewshot" else 1)):
            raise ConfigError(f"{key} must be {'≥ 0' if key == 'num_fewshot' else '≥ 1'}, got {value}")
    if isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    lm_eval, HFLM, TaskManager = require_lm_eval()
    manager = _task_manager(TaskManager, tasks, tasks_dir)
    objects = _load_tasks(manager, tasks)
    if device is not None:
        model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    log.info("lm-eval: %s (num_fewshot=%s, limit=%s, batch %d)", ", ".join(tasks), num_fewshot, limit, batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=objects, num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=bootstrap_iters, log_samples=False, task_manager=manager)
    return _clean(out["results"], out.get("n-samples", {}))
