"""How a command writes a setting that an error message names (:func:`nexttoken.errors.setting`).

The library names a setting by its configuration path (``data.text_field``, ``model.lora.r``) or by a
function's parameter (``device``, ``batch_size``); each command turns that into what its user types:

* ``fit`` and ``validate`` (LightningCLI) take every setting at its path: ``data.text_field`` is
  ``--data.text_field``, a plain name is ``--`` and the name (``ckpt_path`` is ``--ckpt_path``).
* ``eval``, ``inspect``, ``generate``, ``chat`` and ``export`` write a plain name as an option with
  dashes (``batch_size`` is ``--batch-size``) and map the dotted settings they take to their own
  flags or arguments (``data.chat_template`` is ``--chat-template``; ``data.path`` is eval's ``DATA``).
  A dotted setting that such a command does not take is written as ``nexttoken fit`` spells it
  (``--data.replace_invalid_utf8``): the message still names the setting, at the one command that
  has it.
"""

from __future__ import annotations

from collections.abc import Mapping


def fit_flag(setting: str) -> str:
    """``nexttoken fit``'s flag for ``setting``: ``data.text_field`` -> ``--data.text_field``."""
    return f"--{setting}"


def tool_flag(setting: str, own: Mapping[str, str] | None = None) -> str:
    """A plain command's flag for ``setting``: its own spelling in ``own`` when it takes the setting
    (``{"data.path": "DATA"}``), else ``--batch-size`` for ``batch_size``, and fit's flag for a
    dotted setting it does not take."""
    if own and setting in own:
        return own[setting]
    if "." in setting:
        return fit_flag(setting)
    return "--" + setting.replace("_", "-")
