"""No Hub access while lm-eval runs: tasks, datasets and tokenizers are read from local files only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Environment variables that make huggingface_hub, datasets and transformers never touch the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextmanager
def offline() -> Iterator[None]:
    """No Hub access inside the block: the offline variables are set, and the flags that
    ``huggingface_hub`` and ``datasets`` read once at import are switched too (they may have been
    imported before the variables were set)."""
    import datasets
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(OFFLINE_ENV)
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
