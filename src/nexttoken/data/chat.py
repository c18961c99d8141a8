"""Chat and instruction data: records -> conversations -> one rendered text -> tokens, and which of
those tokens the loss scores.

Record shapes (``data.format``; ``auto`` picks from the fields of the first record and says so):

* ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``,
  multi-turn (the Hugging Face / OpenAI chat format);
* ``instruction``: ``{"prompt": ..., "response": ...}``, or Alpaca's ``{"instruction": ...,
  "input": ..., "output": ...}`` (``input`` may be empty or absent; it follows the instruction
  after a blank line); an optional ``"system"`` field becomes a system message;
* ``text``: ``{"text": ...}``: plain documents, which go through the document pipeline, not here.

**Rendering.** A conversation becomes one text through a chat template (Jinja, Hugging Face's
format), rendered by transformers' own ``apply_chat_template``, so the text is exactly what
transformers produces for the same messages. The template is the file ``data.chat_template`` names when
given, else the tokenizer's own (a pretrained model's, or :data:`~nexttoken.data.tokenizers.CHATML_TEMPLATE`
for nexttoken's tokenizers, whose ChatML markers are reserved special tokens). The rendered text
is tokenized whole, with its markers read as special tokens.

**Which tokens are scored** (``train_on``): ``responses`` (every assistant turn), ``last_response``
(the last one) or ``all``. For an assistant turn, exactly the tokens that overlap the assistant's
content, then the tokens up to and including the end-of-turn token (the first special token after
the content, e.g. ``<|im_end|>``; usually the very next token) are scored. This is computed on the
token sequence of the whole rendered conversation, from character spans, never by tokenizing the
prompt alone: when BPE merges a token across the prompt/response boundary (``": " + "Hello"`` ->
``":"``, ``" Hello"``), the merged token is the one the model must produce, and it is scored.

**Finding the content in the rendered text** needs no markers in the template: message ``k`` adds
``render(messages[:k + 1])[len(render(messages[:k])):]`` to the text (for an assistant turn, after
the generation prompt ``render(messages[:k], add_generation_prompt=True)`` too), and its content is
found inside that piece (as written, or trimmed, which is what templates do to content). A template
that renders earlier turns differently once later ones follow cannot be read this way and is refused.

A message whose content holds a special token's text (``"<|im_end|>"`` typed into a message) would
be read as the template's marker, so such examples are flagged (:attr:`Example.has_marker_text`)
and dropped, with a count, by :func:`nexttoken.data.sft.fit_to_block`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nexttoken.data.parallel import ordered_map
from nexttoken.data.records import Record
from nexttoken.data.tokenizers import BUILTIN_KINDS, Tokenizer, document_start, token_byte_counts
from nexttoken.errors import DataError, setting

DataFormat = Literal["auto", "text", "chat", "instruction", "preference"]
TrainOn = Literal["responses", "all", "last_response"]
DATA_FORMATS: tuple[str, ...] = DataFormat.__args__
TRAIN_ON: tuple[str, ...] = TrainOn.__args__
ROLES = ("system", "user", "assistant")
# Every field a conversation (chat or instruction records) or a preference pair may be read from.
CONVERSATION_FIELDS = ("messages", "prompt", "response", "instruction", "input", "output", "system")
CONVERSATION_FIELDS += ("chosen", "rejected")  # preference pairs: nexttoken.data.preferences


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class Conversation:
    """A list of messages and where it came from (``"chats.jsonl, record 17"``) for messages."""

    messages: list[Message]
    where: str


@dataclass
class Example:
    """One rendered conversation as tokens.

    Attributes:
        tokens: (n,) int64 token ids of the whole rendered conversation.
        scored: (n,) bool: token ``i`` is a scored target (predicted from the tokens before it).
        nbytes: (n,) int64 UTF-8 bytes of the rendered text each token covers (special tokens
            cover their own characters and count 0: they are markup).
        where: the record it came from, for messages.
        has_marker_text: a message's content holds a special token's text (read as markup).
    """

    tokens: np.ndarray
    scored: np.ndarray
    nbytes: np.ndarray
    where: str
    has_marker_text: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_scored(self) -> int:
        """Scored targets: the first token is predicted from nothing, so it never counts."""
        return int(self.scored[1:].sum())


# --------------------------------------------------------------------------- records -> conversations
def detect_format(record: Mapping[str, Any], where: str = "the first record") -> tuple[str, str]:
    """``(format, reason)`` for a record: ``chat``, ``instruction`` or ``text``, from its fields."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where} is a {type(record).__name__}, not a record of named fields")
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference", "the records have 'chosen' and 'rejected'"
    if "messages" in keys:
        return "chat", "the records have 'messages'"
    if {"prompt", "response"} <= keys:
        return "instruction", "the records have 'prompt' and 'response'"
    if {"instruction", "output"} <= keys:
        return "instruction", "the records have 'instruction' and 'output' (Alpaca)"
    if "text" in keys:
        return "text", "the records have 'text'"
    fields = ", ".join(repr(k) for k in sorted(keys)[:8]) or "no fields"
    raise DataError(
        f"{where} has {fields}, none of the shapes nexttoken reads: 'messages' (chat), 'prompt' + 'response' "
        "or 'instruction' + 'output' (instruction), or 'text'; rename the fields"
    )


def choose_format(fmt: str, first_record: Mapping[str, Any], where: str) -> tuple[str, str]:
    """``(format, line to print)``: ``fmt`` itself, or for ``auto`` the one the first record's fields give."""
    if fmt not in DATA_FORMATS:
        raise DataError(f"{setting('data.format')} must be one of {', '.join(DATA_FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt, f"format: {fmt}"
    chosen, reason = detect_format(first_record, where)
    return chosen, f"format: {chosen} (auto: {reason})"


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is {type(value).__name__}, not a string; make it text")
    return value


def to_conversation(record: Mapping[str, Any], fmt: str, where: str) -> Conversation:
    """The messages of one record of format ``chat`` or ``instruction``; ``where`` names it in errors."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where} is a {type(record).__name__}, not a record of named fields")
    if fmt == "chat":
        if "messages" not in record:
            raise DataError(
                f"{where} has no 'messages' (the format is chat); give every record a messages list"
            )
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        messages = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, Mapping) or "role" not in entry or "content" not in entry:
                raise DataError(f"{where}: message {i} is not a {{role, content}} object")
            role = entry["role"]
            if role not in ROLES:
                raise DataError(
                    f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)} (rename or drop it)"
                )
            messages.append(Message(role, _string(entry["content"], f"the content of message {i}", where)))
        return Conversation(messages, where)
    if fmt == "instruction":
        if {"prompt", "response"} <= set(record):
            prompt = _string(record["prompt"], "'prompt'", where)
            response = _string(record["response"], "'response'", where)
        elif {"instruction", "output"} <= set(record):
            prompt = _string(record["instruction"], "'instruction'", where)
            extra = _string(record.get("input") or "", "'input'", where)
            prompt = f"{prompt}\n\n{extra}" if extra else prompt
            response = _string(record["output"], "'output'", where)
        else:
            raise DataError(
                f"{where} has neither 'prompt' + 'response' nor 'instruction' + 'output' (the format is "
                "instruction); give every record the same fields"
            )
        messages = [Message("user", prompt), Message("assistant", response)]
        if record.get("system") is not None:
            messages.insert(0, Message("system", _string(record["system"], "'system'", where)))
        return Conversation(messages, where)
    raise DataError(f"records of format {fmt!r} are not conversations; use format chat or instruction")


def record_fields(record: Record) -> dict[str, Any]:
    """The fields a record read with ``optional=CONVERSATION_FIELDS`` has (absent ones dropped)."""
    return {name: value for name, value in record.values.items() if value is not None}


def read_conversations(
    records: Iterable[Mapping[str, Any] | Record], fmt: str = "auto", source: str = "the data"
) -> tuple[list[Conversation], str]:
    """``(conversations, format line)`` of ``records``: plain mappings (numbered from 1 in messages:
    a JSONL file's line numbers when it has no blank lines), or :class:`~nexttoken.data.records.Record`
    s read with ``optional=CONVERSATION_FIELDS`` (named by their file and line). Every record must
    have the chosen format's fields."""
    conversations: list[Conversation] = []
    chosen, line = fmt, ""
    for index, record in enumerate(records, start=1):
        where = f"{source}, record {index}"
        if isinstance(record, Record):
            where, record = record.where, record_fields(record)
        if index == 1:
            chosen, line = choose_format(fmt, record, where)
            if chosen == "text":
                raise DataError(
                    f"{source} holds plain text records ({line}); they are documents, not conversations"
                )
        conversations.append(to_conversation(record, chosen, where))
    if not conversations:
        raise DataError(f"{source} has no records; give it at least one conversation")
    return conversations, line


# --------------------------------------------------------------------------- the template
def _template_error(error: BaseException, template: str) -> str:
    """The error a template raised, with its line in the template when jinja knows it."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    lineno = getattr(error, "lineno", None)  # syntax errors carry it
    traceback = error.__traceback__
    while traceback is not None:  # runtime errors: jinja maps frames of template code to "<template>"
        if traceback.tb_frame.f_code.co_filename == "<template>":
            lineno = traceback.tb_lineno
        traceback = traceback.tb_next
    lines = template.splitlines()
    if isinstance(lineno, int) and 1 <= lineno <= len(lines):
        return f"line {lineno}: {message}  [{lines[lineno - 1].strip()[:120]}]"
    return message


def _locate(content: str, piece: str) -> tuple[int, int] | None:
    """Where ``content`` sits in ``piece`` (the text its message added): as written, else trimmed."""
    if piece.startswith(content):
        return 0, len(content)
    for text in (content, content.strip()):
        # The last occurrence: what precedes the content in a turn is markup (the role's name, ...),
        # which may contain the content's text; the end-of-turn markup after it does not.
        at = piece.rfind(text) if text else -1
        if at >= 0:
            return at, at + len(text)
    return None


@dataclass
class _Span:
    """Message ``index``'s content at characters ``start..end`` of the rendered text; ``turn_end``:
    where the text its message added ends."""

    index: int
    role: str
    start: int
    end: int
    turn_end: int


@dataclass
class ChatTemplate:
    """A Jinja chat template bound to a tokenizer: renders conversations and encodes them with the
    mask of scored tokens.

    Attributes:
        tokenizer: the tokenizer the rendered text is encoded with.
        template: the Jinja source (Hugging Face's chat-template format).
        origin: where it came from, for messages (a file name, or "the tokenizer's chat template").
    """

    tokenizer: Tokenizer
    template: str
    origin: str

    @cached_property
    def _renderer(self) -> Any:
        # transformers renders chat templates (its sandboxed jinja environment, raise_exception,
        # tojson, strftime_now, the special tokens as variables): use it rather than a copy of it.
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        backend = HFTokenizer.from_str(self.tokenizer.to_dict()["tokenizer_json"])
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token=self.tokenizer.eos_token, bos_token=self.tokenizer.bos_token
        )

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, where: str = ""
    ) -> str:
        """The text of ``messages`` (``add_generation_prompt``: followed by the assistant's cue)."""
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._renderer.apply_chat_template(
                as_dicts,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except (
            Exception
        ) as e:  # jinja raises syntax, undefined and the template's own errors; Python ones too
            at = f" for {where}" if where else ""
            raise DataError(
                f"the chat template ({self.origin}) failed to render{at}: "
                f"{_template_error(e, self.template)}; fix the template or the record, or pass another with "
                f"{setting('data.chat_template')} FILE"
            ) from None

    def _spans(self, conversation: Conversation) -> tuple[str, list[_Span]]:
        """The rendered text and where each message's content sits in it (module docstring)."""
        messages, where = conversation.messages, conversation.where
        full = self.render(messages, where=where)
        spans: list[_Span] = []
        before = ""  # the text of the messages so far
        for k, message in enumerate(messages):
            upto = full if k == len(messages) - 1 else self.render(messages[: k + 1], where=where)
            if not upto.startswith(before) or not full.startswith(upto):
                raise DataError(
                    f"the chat template ({self.origin}) renders earlier turns differently once later turns "
                    f"follow ({where}), so the assistant's tokens cannot be told apart; pass a template that "
                    f"renders each turn on its own with {setting('data.chat_template')} FILE"
                )
            start = len(before)
            if message.role == "assistant":
                # The generation prompt (e.g. "<|im_start|>assistant\n") belongs to the prompt.
                cue = self.render(messages[:k], add_generation_prompt=True, where=where)
                if len(before) <= len(cue) <= len(upto) and upto.startswith(cue):
                    start = len(cue)
            found = _locate(message.content, upto[start:])
            if found is None:
                raise DataError(
                    f"the chat template ({self.origin}) changes the content of message {k} ({where}) beyond "
                    "trimming it, so its tokens cannot be found in the rendered text; pass a template that "
                    f"writes message contents as they are with {setting('data.chat_template')} FILE"
                )
            spans.append(_Span(k, message.role, start + found[0], start + found[1], len(upto)))
            before = upto
        return full, spans

    def encode(self, conversation: Conversation, train_on: TrainOn = "responses") -> Example:
        """The conversation's tokens and which of them are scored (see the module docstring)."""
        if train_on not in TRAIN_ON:
            raise DataError(
                f"{setting('data.train_on')} must be one of {', '.join(TRAIN_ON)}, got {train_on!r}"
            )
        text, spans = self._spans(conversation)
        ids, offsets = self.tokenizer.encode_with_offsets(text, parse_special=True)
        tokens = np.asarray(ids, dtype=np.int64)
        bounds = np.asarray(offsets, dtype=np.int64).reshape(len(ids), 2)
        starts, ends = bounds[:, 0], bounds[:, 1]
        special = np.isin(tokens, np.fromiter(self.tokenizer.special_ids, dtype=np.int64))
        # Markers are markup, not text: a special token covers its own characters and counts 0 bytes
        # (token_byte_counts' own rule would credit them to the token after it).
        nbytes = np.where(special, 0, token_byte_counts(text, offsets, np.zeros(len(tokens), dtype=bool)))

        marker_text = any(
            bool((special & (starts >= s.start) & (starts < s.end)).any()) for s in spans if s.end > s.start
        )
        if train_on == "all":
            scored = np.ones(len(tokens), dtype=bool)
        else:
            turns = [s for s in spans if s.role == "assistant"]
            if not turns:
                raise DataError(
                    f"{conversation.where} has no assistant turn, so {setting('data.train_on')} {train_on} "
                    f"scores nothing in it; add the assistant's reply, or use {setting('data.train_on')} all"
                )
            if train_on == "last_response":
                turns = turns[-1:]
            scored = np.zeros(len(tokens), dtype=bool)
            for turn in turns:
                first, end_of_turn = self._turn_tokens(turn, starts, ends, special, conversation.where)
                scored[first : end_of_turn + 1] = True
        return Example(tokens, scored, nbytes.astype(np.int64), conversation.where, marker_text)

    def _turn_tokens(
        self, turn: _Span, starts: np.ndarray, ends: np.ndarray, special: np.ndarray, where: str
    ) -> tuple[int, int]:
        """``(first, end_of_turn)``: indices of the turn's first content token and of its
        end-of-turn token (the first special token after the content, inside the turn)."""
        overlaps = (
            (ends > turn.start) & (starts < turn.end) if turn.end > turn.start else np.zeros_like(special)
        )
        after = (starts >= turn.end) & ~overlaps
        candidates = np.flatnonzero(after & special & (starts < turn.turn_end))
        if not len(candidates):
            raise DataError(
                f"the chat template ({self.origin}) puts no special end-of-turn token after the assistant's reply "
                f"({where}), so a model would never learn where its reply ends; end assistant turns with a "
                "special token (for example {{ eos_token }}) in the template"
            )
        end_of_turn = int(candidates[0])
        content = np.flatnonzero(overlaps)
        return (int(content[0]) if len(content) else end_of_turn), end_of_turn

    @cached_property
    def end_of_turn_id(self) -> int:
        """The token that ends an assistant turn (where sampling a reply stops)."""
        probe = Conversation([Message("user", "Hi!"), Message("assistant", "Hello.")], "a test conversation")
        example = self.encode(probe, "last_response")
        return int(example.tokens[np.flatnonzero(example.scored)[-1]])

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The tokens that prompt the assistant's next reply: the conversation so far rendered with
        the generation prompt, markers read as special tokens."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode_with_offsets(text, parse_special=True)[0]


def resolve_chat_template(tokenizer: Tokenizer, template_file: str | Path | None = None) -> ChatTemplate:
    """The template to render conversations with: ``template_file`` (Jinja) when given, else the
    tokenizer's own. Checked at once: it must render a short conversation and end the assistant's
    turn with a special token."""
    if template_file is not None:
        path = Path(template_file).expanduser()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(
                f"{setting('data.chat_template')} {path}: cannot read it ({type(e).__name__}); pass a Jinja "
                "template file"
            ) from None
        template = ChatTemplate(tokenizer, source, str(path))
    elif tokenizer.chat_template:
        template = ChatTemplate(tokenizer, tokenizer.chat_template, "the tokenizer's chat template")
    else:
        raise DataError(
            "the model's tokenizer has no chat template, so conversations cannot be rendered; pass one with "
            f"{setting('data.chat_template')} FILE (a Jinja chat template)"
        )
    template.end_of_turn_id  # noqa: B018 -- renders and encodes a probe conversation now, not mid-dataset
    return template


def encode_conversations(
    template: ChatTemplate, conversations: Iterable[Conversation], train_on: TrainOn = "responses"
) -> list[Example]:
    """Every conversation rendered, tokenized and masked (errors name the record)."""
    return [template.encode(conversation, train_on) for conversation in conversations]


# --------------------------------------------------------------------------- encoding, in workers
# Conversations per job handed to an encoding worker.
_JOB_CONVERSATIONS = 256
_worker_template: ChatTemplate | None = None


def _start_encoder(tokenizer_state: dict[str, Any], template: str, origin: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    global _worker_template
    _worker_template = ChatTemplate(Tokenizer.from_dict(tokenizer_state), template, origin)


def _encode_in_worker(train_on: TrainOn, conversations: list[Conversation]) -> list[Example]:
    return encode_conversations(_worker_template, conversations, train_on)


def encode_in_parallel(
    template: ChatTemplate, conversations: Sequence[Conversation], train_on: TrainOn, workers: int
) -> Iterator[Example]:
    """:func:`encode_conversations` in ``workers`` processes (0: this one), in order (the workers
    import this module, not torch)."""
    jobs = (
        list(conversations[i : i + _JOB_CONVERSATIONS])
        for i in range(0, len(conversations), _JOB_CONVERSATIONS)
    )
    if workers == 0:
        results = ordered_map(lambda job: encode_conversations(template, job, train_on), jobs, 0)
    else:
        results = ordered_map(
            partial(_encode_in_worker, train_on),
            jobs,
            workers,
            initializer=_start_encoder,
            initargs=(template.tokenizer.to_dict(), template.template, template.origin),
        )
    for examples in results:
        yield from examples


# --------------------------------------------------------------------------- what starts a document
@dataclass(frozen=True)
class DocumentStart:
    """What starts each document (:func:`nexttoken.data.tokenizers.document_start`) and why, in words.

    Attributes:
        token, token_id: the start token (None: no token; documents are kept apart by the EOS alone).
        template_writes_bos: whether the chat template itself writes the tokenizer's BOS (None: no
            template, or the tokenizer has no BOS for it to write).
        double_bos: the template writes the BOS and the tokenizer also adds one to every text it
            encodes with its special tokens.
        line: ``document start: ...``, for a start summary; warning: one line, or None.
    """

    token: str | None
    token_id: int | None
    template_writes_bos: bool | None
    double_bos: bool
    line: str
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "token_id": self.token_id,
            "template_writes_bos": self.template_writes_bos,
            "double_bos": self.double_bos,
            "line": self.line,
            "warning": self.warning,
        }


def _probe(template: ChatTemplate) -> str | None:
    """A short conversation as ``template`` renders it (None: it does not render one)."""
    try:
        return template.render([Message("user", "Hi!"), Message("assistant", "Hello.")])
    except DataError:
        return None


def describe_document_start(
    tokenizer: Tokenizer, template: ChatTemplate | None = None, *, chat_examples: bool = False
) -> DocumentStart:
    """The one wording of what starts each document with ``tokenizer`` (and ``template``, its chat
    template, when there is one), for ``nexttoken fit`` and ``nexttoken eval`` alike: the token and
    why, and a warning when the chat template writes a BOS that the tokenizer also adds (a double BOS:
    ``apply_chat_template`` then encoding with special tokens, transformers' default, gives two).
    ``chat_examples``: the documents are conversations rendered by ``template``, whose tokens are the
    rendered text's alone (nothing is put before them)."""
    start = document_start(tokenizer)
    token = tokenizer.decode([start]) if start is not None else None
    bos = tokenizer.bos_token
    # Rendering needs transformers (seconds to import): only where the answer depends on it.
    rendered = _probe(template) if template is not None and (chat_examples or bos is not None) else None
    if chat_examples and rendered is not None:
        ids = tokenizer.encode_with_offsets(rendered, parse_special=True)[0]
        start = ids[0] if ids else None
        token = tokenizer.decode([start]) if start is not None else None
        why = "each example starts with what its chat template writes; nothing is added before it"
    elif tokenizer.kind in BUILTIN_KINDS:
        why = "nexttoken's own tokenizers start each document with their EOS, which also ends the one before"
    elif start is not None:
        why = "the tokenizer's BOS; it adds one to every text"
    elif bos is not None:
        why = (
            f"the tokenizer does not add its BOS {bos}; documents are kept apart by its EOS "
            f"{tokenizer.eos_token} alone"
        )
    else:
        why = f"the tokenizer has no BOS; documents are kept apart by its EOS {tokenizer.eos_token} alone"
    writes = None
    if template is not None:
        if bos is None:
            why += "; there is no BOS for its chat template to add"
        else:
            writes = bos in rendered if rendered is not None else None
            if writes is None:
                why += "; its chat template did not render a test conversation"
            else:
                why += (
                    f"; its chat template {'writes' if writes else 'does not add'} {bos if writes else 'one'}"
                )
    double = bool(writes) and tokenizer.adds_bos
    warning = None
    if double:
        warning = (
            f"warning: double BOS: the chat template ({template.origin}) writes {bos} and the tokenizer adds "
            f"{bos} to every text it encodes with its special tokens, so a chat rendered by the template and "
            f"then encoded that way (transformers' default) starts with two; nexttoken encodes rendered chats "
            f"without adding one"
        )
    line = f"document start: {token if token is not None else 'no token'} ({why})"
    return DocumentStart(token, start, writes, double, line, warning)
