"""Where lm-eval results go and how they are shown: lm-eval's own tables and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def results_path(model_path: str | Path, task_names: Sequence[str]) -> Path | None:
    """Where the results of a checkpoint of a run go: ``RUN/tasks/<checkpoint>--<tasks>.json``
    (None for a model that is not a checkpoint of a run folder)."""
    path = Path(model_path)
    run = path.parent.parent
    if path.suffix != ".ckpt" or path.parent.name != "checkpoints" or not (run / "config.yaml").is_file():
        return None
    label = "+".join(task_names)
    if len(label) > 80:
        label = f"{label[:60]}+{len(task_names)}-tasks"
    return run / "tasks" / f"{path.stem}--{label.replace('/', '_')}.json"


def results_json(results: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, default=handle_non_serializable, ensure_ascii=False)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own tables: tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
