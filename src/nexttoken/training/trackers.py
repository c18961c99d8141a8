"""Experiment trackers beside the run's CSV: Lightning's TensorBoard, MLflow and W&B loggers
(``trainer.logger``), set up so that a run keeps everything in its run folder.

The run's CSV logger (``metrics.csv``, which the report, the curves and resume read) is always the
first logger: it decides the run folder (``runs/version_N``) and Lightning puts the checkpoints
under the first logger's folder. A plain ``CSVLogger`` in the list *is* that CSV. The trackers are
given, unless their own settings say otherwise, a place inside the run folder:

* ``TensorBoardLogger``: ``runs/version_N/tensorboard/`` (a resumed run purges the steps from its
  checkpoint on, as metrics.csv does, so TensorBoard shows one curve);
* ``MLFlowLogger``: a local file store ``runs/version_N/mlruns/`` (``tracking_uri`` or
  ``$MLFLOW_TRACKING_URI`` elsewhere wins), experiment ``nexttoken``, run name ``version_N``;
* ``WandbLogger``: ``runs/version_N/wandb/`` (``offline: true`` for no network).

A tracker whose package is not installed is refused before anything is written (:func:`check_installed`).
Every logger gets the same metric names (``train/loss``, ``train/tokens_seen``, ...; docs/trackers.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from nexttoken.errors import UserError, setting

# Logger class -> (the modules it can use, any one of them; how to install one).
REQUIREMENTS = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), 'pip install "nexttoken[tensorboard]"'),
    "MLFlowLogger": (("mlflow",), 'pip install "nexttoken[mlflow]"'),
    "WandbLogger": (("wandb",), "pip install wandb"),
    "CometLogger": (("comet_ml",), "pip install comet-ml"),
    "NeptuneLogger": (("neptune",), "pip install neptune"),
}
CSV_LOGGERS = ("CSVLogger",)
# Where an MLflow run goes when nothing says otherwise (Lightning's own defaults).
MLFLOW_DEFAULT_DIRS = ("./mlruns", "mlruns")
MLFLOW_DEFAULT_EXPERIMENT = "lightning_logs"
EXPERIMENT_NAME = "nexttoken"
MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


def class_name(entry) -> str:
    """``TensorBoardLogger`` for a logger given as ``{"class_path": "lightning...TensorBoardLogger", ...}``."""
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1]


def module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_installed(entries) -> None:
    """Refuse a logger whose package is missing, in one line naming how to install it."""
    for entry in entries:
        name = class_name(entry)
        if name in REQUIREMENTS:
            modules, install = REQUIREMENTS[name]
            if not any(module_installed(m) for m in modules):
                raise UserError(
                    f"{setting('trainer.logger')} {name} needs the {modules[0]} package, which is not "
                    f"installed: {install}"
                )


def _left_at_default(value, defaults) -> bool:
    return value is None or str(value) in {str(d) for d in defaults}


def place_in_run(entry, run_dir: Path, resume_step: int | None, roots: tuple[str, ...]) -> None:
    """Point a tracker (a logger's parsed ``class_path``/``init_args``) into the run folder ``run_dir``,
    unless its own settings name another place. ``roots``: the values a ``save_dir`` has when nobody
    set it (the CSV logger's, which jsonargparse carries over to the logger that replaces it)."""
    name, args = class_name(entry), entry.get("init_args")
    if args is None:
        return
    if name == "TensorBoardLogger":
        if _left_at_default(args.get("save_dir"), roots):
            args["save_dir"], args["name"], args["version"] = str(run_dir), "tensorboard", ""
        if resume_step is not None and args.get("purge_step") is None:
            args["purge_step"] = resume_step  # hide the steps the resumed run logs again
    elif name == "MLFlowLogger":
        if args.get("tracking_uri") is None and _left_at_default(
            args.get("save_dir"), (*roots, *MLFLOW_DEFAULT_DIRS)
        ):
            args["save_dir"] = str(run_dir / "mlruns")
            # MLflow 3.x refuses a file store unless told it is wanted; this one is the run folder's own.
            os.environ.setdefault(MLFLOW_FILE_STORE_OPT_IN, "true")
        if args.get("experiment_name") in (None, MLFLOW_DEFAULT_EXPERIMENT):
            args["experiment_name"] = EXPERIMENT_NAME
        if args.get("run_name") is None:
            args["run_name"] = run_dir.name
    elif name == "WandbLogger":
        if _left_at_default(args.get("save_dir"), (*roots, ".")):
            args["save_dir"] = str(run_dir)
