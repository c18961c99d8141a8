"""Bad input, as exceptions that the command line turns into one line and a non-zero exit.

A message names the settings it is about with :func:`setting` (``setting("data.text_field")``), never
with a command line's spelling: the library does not know whether it runs under ``nexttoken fit``
(``--data.text_field``), ``nexttoken eval`` (``--text-field``) or a user's own Python. The command that
reports the error spells each setting its own way (:meth:`UserError.message`); printed as it is, an
error names the setting by its parameter name (``text_field``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# A setting's name inside a message sits between two of these (a control character no text holds).
_MARK = "\x1f"
_SETTING = re.compile(f"{_MARK}([A-Za-z0-9_.]+){_MARK}")


def setting(name: str) -> str:
    """The setting ``name`` inside an error message: its dotted path in the configuration
    (``data.text_field``, ``model.lora.r``) or a function's parameter (``bos``, ``context``)."""
    return f"{_MARK}{name}{_MARK}"


def parameter_name(name: str) -> str:
    """How a setting reads outside any command line: its parameter name (``data.text_field`` -> ``text_field``)."""
    return name.rsplit(".", 1)[-1]


def spelled(text: str, spell: Callable[[str], str] = parameter_name) -> str:
    """``text`` with every :func:`setting` in it written as ``spell(name)``: for errors, and for the
    notes a command prints that name settings too."""
    return _SETTING.sub(lambda m: spell(m.group(1)), text)


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do, in one line."""

    def settings(self) -> list[str]:
        """The settings the message names, in order."""
        return _SETTING.findall(self.args[0] if self.args else "")

    def message(self, spell: Callable[[str], str] = parameter_name) -> str:
        """The message with every setting written as ``spell(name)`` (a command's flag for it)."""
        return spelled(str(self.args[0]) if self.args else "", spell)

    def __str__(self) -> str:
        return self.message()


class DataError(UserError):
    """The corpus or data settings cannot be used; the message says what is wrong and what to do."""


class DataWarning(UserWarning):
    """A file was skipped or altered while reading the corpus."""
