"""Finding lm-eval tasks (lm-eval's own, or folders of task YAML files), loading their
data offline, and running them on a model."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.api.model import LM

from nexttoken.errors import UserError, setting
from nexttoken.scoring.lmeval.adapter import NextTokenLM
from nexttoken.scoring.lmeval.offline import offline


def task_manager(names: Sequence[str], include_paths: Sequence[str] = ()):
    """lm-eval's ``TaskManager`` that knows ``names``: the ``include_paths`` folders alone when they
    hold every name (indexing lm-eval's thousands of built-in tasks takes seconds), else both."""
    from lm_eval.tasks import TaskManager

    for folder in include_paths:
        if not Path(folder).is_dir():
            raise UserError(
                f"{setting('include_path')} {folder}: no such folder; pass a folder of task YAML files"
            )
    if include_paths:
        local = TaskManager(include_path=list(include_paths), include_defaults=False)
        if all(_known(local, name) for name in names):
            return local
    return TaskManager(include_path=list(include_paths) or None)


def _known(manager, name: str) -> bool:
    if name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
        return True
    return any(ch in name for ch in "*?[") and bool(fnmatch.filter(manager.all_tasks, name))


def check_task_names(manager, names: Sequence[str], include_paths: Sequence[str] = ()) -> list[str]:
    """``names`` with glob patterns expanded; an unknown name is an error suggesting close ones."""
    resolved: list[str] = []
    for name in names:
        if not _known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            where = (
                f" or in {setting('include_path')} {', '.join(map(str, include_paths))}"
                if include_paths
                else ""
            )
            raise UserError(
                f"unknown task {name!r}: not one of lm-eval's tasks{where}{hint} "
                f"(add a folder of task YAML files with {setting('include_path')} DIR)"
            )
        matches = sorted(fnmatch.filter(manager.all_tasks, name)) if any(c in name for c in "*?[") else [name]
        resolved += [m for m in matches if m not in resolved]
    return resolved


def load_tasks(manager, names: Sequence[str]) -> list:
    """The tasks (and groups) named, with their data loaded, offline. A task whose data would need a
    download is an error naming the task."""
    loaded = []
    for name in names:
        try:
            with offline():
                found = manager.load([name])
        except Exception as error:  # noqa: BLE001 - lm-eval and datasets raise many kinds here
            raise _task_error(name, error) from error
        if name in found.get("groups", {}):
            loaded.append(found["groups"][name])
        else:
            loaded += list(found["tasks"].values())
    return loaded


def _task_error(name: str, error: BaseException) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    download = isinstance(error, (ConnectionError, FileNotFoundError)) or type(error).__name__ in (
        "DatasetNotFoundError",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
    )
    if download:
        return UserError(
            f"task {name!r}: its data is not available offline ({reason}); provide its data locally: a task "
            f"YAML under {setting('include_path')} whose dataset_kwargs.data_files name local JSONL/Parquet/CSV files, "
            "or the datasets cache ($HF_DATASETS_CACHE) filled where there is network"
        )
    return UserError(f"task {name!r} could not be loaded: {type(error).__name__}: {reason}")


def evaluate_tasks(
    lm: LM,
    tasks: Sequence,
    manager,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``lm`` (a :class:`NextTokenLM`, or any lm-eval model) on loaded
    ``tasks``, offline; a :class:`NextTokenLM`'s settings are recorded under ``"nexttoken"``."""
    with offline():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            apply_chat_template=apply_chat_template,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
        )
    if isinstance(lm, NextTokenLM):
        results["nexttoken"] = lm.settings()
    return results
