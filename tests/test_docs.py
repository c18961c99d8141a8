"""The documentation's command lines and links are real.

Every ``nexttoken ...`` command line shown in README.md and docs/*.md, in code blocks and in inline
code, is parsed by ``nexttoken.cli.check_command_line`` without running it: a command or a flag that
does not exist, or a value that is not one of a flag's choices, fails here. Every relative link of
those pages points to a file that exists, and to a heading of it when it names one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nexttoken.cli import check_command_line
from nexttoken.errors import UserError

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("fit", "validate", "eval", "inspect", "generate", "chat", "export", "overlap", "average")

# A placeholder value where a flag expects a number (`--context N`, `--top K`).
NUMBER_PLACEHOLDER = re.compile(r"^[A-Z]$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
REDIRECTION = re.compile(r"^\d*(>>?|<)(&\d+)?$")  # `>`, `2>`, `>>`, `2>&1`, `<`
REDIRECTION_WITH_TARGET = re.compile(r"^\d*(>>?|<)[^&]+$")  # `>file`
SHELL_SEPARATORS = ("|", "||", "&&", ";", "&")
# Commands that start nexttoken on several processes or machines: what follows them is still checked.
LAUNCHERS = ("srun", "torchrun")


# --------------------------------------------------------------------------- reading the pages
def strip_comment(line: str) -> str:
    """``line`` without a shell comment: a ``#`` outside quotes that starts a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def command_words(line: str) -> list[str] | None:
    """The words after ``nexttoken`` of one shell command line, or None when it does not run
    nexttoken: env-var prefixes, redirections, pipes and what follows them are dropped."""
    try:
        words = shlex.split(strip_comment(line))
    except ValueError:  # unbalanced quotes: prose, not a command
        return None
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    if (
        Path(words[0]).name in LAUNCHERS
    ):  # `srun [options] nexttoken ...`, `torchrun [options] -m nexttoken ...`
        start = next(
            (i for i, w in enumerate(words) if w == "nexttoken" or w.endswith("bin/nexttoken")), None
        )
        module = next((i for i in range(len(words) - 1) if words[i : i + 2] == ["-m", "nexttoken"]), None)
        if module is not None and (start is None or module < start):
            words = words[module + 2 :]
        elif start is not None:
            words = words[start + 1 :]
        else:
            return None
    elif words[0] == "nexttoken" or words[0].endswith("bin/nexttoken"):
        words = words[1:]
    elif len(words) > 2 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "nexttoken"]:
        words = words[3:]
    else:
        return None
    kept: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in SHELL_SEPARATORS:
            break
        elif REDIRECTION.match(word):
            skip_next = "&" not in word  # `> file` names its target next; `2>&1` does not
        elif not REDIRECTION_WITH_TARGET.match(word):
            kept.append(word)
    return kept


def shown_commands(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, command line, in a code block)`` for each line of ``text`` that may be a
    nexttoken command: the lines of code blocks (with ``\\`` continuations, and a synopsis's
    indented ``[...]`` lines, joined) and the inline code of the prose (spans may cross lines)."""
    found: list[tuple[int, str, bool]] = []
    fence = None
    prose: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        marker = re.match(r"^\s*(```|~~~)", line)
        if marker and (fence is None or marker.group(1) == fence):
            if pending:
                found.append((*pending, True))
                pending = None
            fence = marker.group(1) if fence is None else None
            continue
        if fence is None:
            prose.append((number, line))
            continue
        if pending and pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1] + " " + line.strip())
        elif pending and line.lstrip().startswith("[") and line.startswith(" "):
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            if pending:
                found.append((*pending, True))
            pending = (number, line.strip())
    if pending:
        found.append((*pending, True))
    # Inline code, paragraph by paragraph, so that a span may cross a line break.
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        joined = " ".join(text for _, text in paragraph)
        starts = []
        position = 0
        for line_number, text in paragraph:
            starts.append((position, line_number))
            position += len(text) + 1
        for span in re.finditer(r"`([^`]+)`", joined):
            line_number = max(n for start, n in starts if start <= span.start())
            found.append((line_number, span.group(1), False))
        paragraph = []
    kept = []
    for number, line, in_block in found:
        words = command_words(line)
        # Inline `nexttoken` alone names the program (or the package), not a command line.
        if words is not None and (words or in_block):
            kept.append((number, line, in_block))
    return kept


def is_option(word: str) -> bool:
    return word.startswith("-") and word != "-"


def is_list_value(word: str) -> bool:
    """A quoted list given as one value (``--trainer.logger "[CSVLogger, TensorBoardLogger]"``), not a
    synopsis' optional group: one word with brackets around items and a comma between them."""
    return word.startswith("[") and word.endswith("]") and ", " in word


def synopsis_forms(words: list[str], choices: dict[str, list[str]]) -> list[list[str]]:
    """A synopsis (``eval MODEL [--context N] [--dtype auto|float32]``) as command lines: the words
    outside brackets, once with every optional group, and once for each alternative of an
    ``a|b|c`` value; a value written ``...`` takes the alternatives another synopsis gives the flag."""
    base: list[str] = []
    groups: list[list[str]] = []
    group: list[str] | None = None
    for word in words:
        if word.startswith("[") and group is None:
            group = []
            word = word[1:]
        target = group if group is not None else base
        if group is not None and word.count("]") > word.count("["):
            target.append(word[:-1])
            groups.append(group)
            group = None
        else:
            target.append(word)
    if group is not None:
        groups.append(group)
    forms = [base + [w for g in groups for w in g]]
    for position, word in enumerate(forms[0]):
        flag = forms[0][position - 1] if position else ""
        alternatives = None
        if "|" in word and not is_option(word):
            alternatives = word.split("|")
        elif word == "..." and is_option(flag) and flag in choices:
            alternatives = choices[flag]
        if alternatives:
            for form in forms:
                form[position] = alternatives[0]
            forms += [[*forms[0][:position], alt, *forms[0][position + 1 :]] for alt in alternatives[1:]]
    return forms


def choices_in_synopses(commands: list[tuple[str, int, str, bool]]) -> dict[str, list[str]]:
    found = {}
    for _, _, line, _ in commands:
        words = command_words(line)
        for flag, value in zip(words, words[1:]):
            flag, value = flag.lstrip("["), value.rstrip("]")
            if is_option(flag) and "|" in value and not is_option(value):
                found.setdefault(flag, value.split("|"))
    return found


def all_commands() -> list[tuple[str, int, str, bool]]:
    return [
        (page.relative_to(ROOT).as_posix(), number, line, in_block)
        for page in PAGES
        for number, line, in_block in shown_commands(page.read_text(encoding="utf-8"))
    ]


SHOWN = all_commands()


def check_shown(words: list[str], fragment: bool) -> None:
    """Check one command line. Inline code may name a command without its positional arguments
    (`nexttoken eval`), or end with a flag without its value (`nexttoken eval --tasks`): those are
    filled in with placeholders and the line checked again."""
    words = ["1" if NUMBER_PLACEHOLDER.match(w) else w for w in words]
    for _ in range(3):
        try:
            return check_command_line(words)
        except UserError as error:
            missing = re.search(r"the following arguments are required: ([^;]+)", str(error))
            if fragment and missing:
                command = 1 if words and words[0] in COMMANDS else 0
                filled = [f"placeholder-{i}" for i, _ in enumerate(missing.group(1).split(","))]
                words = [*words[: command + 1], *filled, *words[command + 1 :]]
            elif fragment and words and f"{words[-1]}: expected one argument" in str(error):
                words = [*words, "placeholder"]
            else:
                raise
    check_command_line(words)


# --------------------------------------------------------------------------- the checks
@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # `--config configs/...` is read relative to the repository


@pytest.mark.parametrize(
    ("page", "number", "line", "in_block"),
    SHOWN,
    ids=[f"{page}:{number}:{line[:60]}" for page, number, line, _ in SHOWN],
)
def test_every_shown_command_parses(page, number, line, in_block):
    words = command_words(line)
    synopsis = any("[" in w and not is_list_value(w) for w in words)
    forms = synopsis_forms(words, choices_in_synopses(SHOWN)) if synopsis else [words]
    for form in forms:
        try:
            check_shown(form, fragment=not in_block)
        except UserError as error:
            pytest.fail(f"{page}:{number}: `nexttoken {shlex.join(form)}`: {error}")


def command_of(line: str) -> str:
    words = [w for w in command_words(line) if w not in ("--debug", "--verbose")]
    return words[0] if words and not words[0].startswith("-") else "fit"


def test_the_pages_show_every_command():
    assert set(COMMANDS) <= {command_of(line) for _, _, line, _ in SHOWN}
    readme = {command_of(line) for page, _, line, _ in SHOWN if page == "README.md"}
    assert set(COMMANDS) <= readme, "the README's tour shows every command"
    assert any("--tasks" in command_words(line) for page, _, line, _ in SHOWN if page == "README.md")


def test_a_wrong_flag_or_command_is_refused():
    for argv in (
        ["eval", "m.gguf", "--no-such-flag"],
        ["fit", "--data.no_such"],
        ["--data.no_such"],  # no command: fit
        ["validate", "--trainer.no_such", "1"],
        ["inspect", "m.gguf", "t.txt", "--dtype", "float8"],
        ["fit", "--model.fused_loss", "maybe"],
        ["frobnicate"],
    ):
        with pytest.raises(UserError):
            check_command_line(argv)


def test_global_flags_and_configs_are_accepted():
    for argv in (
        [],
        ["--verbose"],
        ["--debug", "eval", "m.gguf", "d.txt", "--json"],
        ["--version"],
        ["--help"],
        ["fit", "--help"],
        ["fit", "--print_config"],
        ["fit", "--config", "configs/shakespeare-10min.yaml", "--trainer.max_steps", "5"],
        ["eval", "m.gguf", "--json", "d.txt"],  # options between positionals
    ):
        check_command_line(argv)


def test_reading_command_lines():
    assert command_words("OMP_NUM_THREADS=1 .venv/bin/nexttoken fit > fit.log 2>&1  # a comment") == ["fit"]
    assert command_words("nexttoken eval m.ckpt d.txt --json | jq .loss") == [
        "eval",
        "m.ckpt",
        "d.txt",
        "--json",
    ]
    assert command_words('nexttoken fit --data.path "a b/x.jsonl#17"') == [
        "fit",
        "--data.path",
        "a b/x.jsonl#17",
    ]
    assert command_words("python -m nexttoken validate --ckpt_path last") == [
        "validate",
        "--ckpt_path",
        "last",
    ]
    assert command_words("srun --ntasks-per-node 4 .venv/bin/nexttoken fit --trainer.num_nodes 2") == [
        "fit",
        "--trainer.num_nodes",
        "2",
    ]
    assert command_words("torchrun --nnodes 2 --node-rank 1 -m nexttoken fit --trainer.devices 1") == [
        "fit",
        "--trainer.devices",
        "1",
    ]
    assert command_words("srun hostname") is None
    assert command_words("nexttoken.schedule") is None and command_words("pip install nexttoken") is None
    assert command_words("~/.cache/nexttoken") is None
    page = (
        "Run `nexttoken fit\n--trainer.max_steps 5` here.\n\n```bash\n"
        "nexttoken eval m.gguf \\\n    --context 8\n```\n```\nnexttoken eval MODEL\n    [--bos auto|yes|no]\n```\n"
    )
    assert shown_commands(page) == [
        (5, "nexttoken eval m.gguf  --context 8", True),
        (9, "nexttoken eval MODEL [--bos auto|yes|no]", True),
        (1, "nexttoken fit --trainer.max_steps 5", False),
    ]
    forms = synopsis_forms(
        ["eval", "MODEL", "[--bos", "auto|yes]", "[--dtype", "...]"], {"--dtype": ["x", "y"]}
    )
    assert forms == [
        ["eval", "MODEL", "--bos", "auto", "--dtype", "x"],
        ["eval", "MODEL", "--bos", "yes", "--dtype", "x"],
        ["eval", "MODEL", "--bos", "auto", "--dtype", "y"],
    ]


# --------------------------------------------------------------------------- links
def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


LINKS = [
    (page, target)
    for page in PAGES
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
    if not re.match(r"^[a-z]+://", target)
]


@pytest.mark.parametrize(
    ("page", "target"), LINKS, ids=[f"{p.relative_to(ROOT).as_posix()}->{t}" for p, t in LINKS]
)
def test_every_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor and linked.suffix == ".md":
        assert anchor in anchors(linked), f"{page.relative_to(ROOT)} links to {target}: no such heading"
