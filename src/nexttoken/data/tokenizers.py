"""Tokenizers: one class over a Hugging Face ``tokenizers.Tokenizer``, whatever its kind.

Every kind is a standard ``tokenizer.json``, so what we train here loads in ``transformers``
(``PreTrainedTokenizerFast`` / ``AutoTokenizer``), and a checkpoint can carry its tokenizer as a
string. Kinds:

- ``bytes``: UTF-8 bytes, token id == byte value, plus ``<|endoftext|>`` and the two chat markers
  (vocabulary 259). Built as a byte-level BPE with no merges, so it behaves like every other kind.
- ``bpe``: byte-level BPE trained here on the training split (every byte stays representable).

Both reserve ChatML's role markers ``<|im_start|>``/``<|im_end|>`` as special tokens and carry
:data:`CHATML_TEMPLATE`, so a model trained here can be fine-tuned on conversations and chatted
with (:mod:`nexttoken.data.chat`). A pretrained tokenizer keeps its own chat template.
- ``hf``: a pretrained model's tokenizer (a local folder or ``tokenizer.json``, a GGUF file, or the
  tokenizer ``transformers`` loaded beside a model).

Training, evaluation, sampling and export all use this one class, so they cannot disagree.

Text is encoded without adding special tokens, and special-token strings that occur in the text
(a literal ``<|endoftext|>`` in a document) are encoded as plain text: document boundaries come
only from :func:`document_start`/:func:`document_frame`, never from the data. The one exception
is a rendered chat template, whose markers ARE special tokens
(``encode_with_offsets(text, parse_special=True)``).

**What starts a document** is decided by :func:`document_start` alone: the EOS for nexttoken's own
tokenizers (training streams read ``EOS doc0 EOS doc1 ...``), the BOS for a pretrained tokenizer
that itself puts one in front of every text (Llama, Gemma, ...), and nothing for one that does not
(GPT-2, SmolLM2, Qwen: each document's first token then has no left context and is not scored).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nexttoken.data.documents import content_digest
from nexttoken.errors import DataError, setting
from nexttoken.io import write_atomically

EOS_TOKEN = "<|endoftext|>"
# ChatML's role markers, reserved as special tokens by nexttoken's own tokenizers.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
# The chat template of nexttoken's own tokenizers (ChatML): every turn is
# <|im_start|>ROLE\nCONTENT<|im_end|>\n, and a reply is prompted by <|im_start|>assistant\n.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILTIN_KINDS = ("bytes", "bpe")
# End-of-document and beginning-of-document tokens of common local tokenizers, in order of preference.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
_DICT_FORMAT = 1


def _gpt2_byte_alphabet() -> list[str]:
    """The printable character GPT-2's byte-level scheme uses for each byte value 0..255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _byte_level(model: models.Model, split_words: bool = True) -> HFTokenizer:
    tok = HFTokenizer(model)
    # No prefix space: a document's first word is encoded as written, and decoding is lossless.
    # Splitting into words (GPT-2's regex) only matters to merges; without merges it is wasted time.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    return tok


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """``offsets[c]`` = UTF-8 byte offset of character ``c``; ``offsets[len(text)]`` = total bytes."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    offsets = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(widths, out=offsets[1:])
    return offsets


def token_byte_counts(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int]) -> np.ndarray:
    """Bytes of ``text`` each token covers, from character ``offsets``; they sum to the text's bytes.

    A token is credited with the bytes from the end of what earlier tokens covered to its own end,
    so a gap (a stripped space, a normalized-away character) goes to the token that follows it, and
    several tokens of one character (byte fallback) credit it once. Special tokens cover nothing.
    Bytes after the last token's end go to the last non-special token.
    """
    n = len(offsets)
    char_to_byte = _char_to_byte_offsets(text)
    total = int(char_to_byte[-1])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ends_chars = np.asarray(offsets, dtype=np.int64).reshape(n, 2)[:, 1]
    ends = char_to_byte[np.clip(ends_chars, 0, len(text))]
    is_special = np.asarray(special, dtype=bool)
    ends[is_special] = 0
    covered = np.maximum.accumulate(ends)
    counts = np.diff(covered, prepend=0)
    content = np.flatnonzero(~is_special)
    if len(content):
        counts[content[-1]] += total - covered[-1]
    return counts


class Tokenizer:
    """A tokenizer of any kind, with the handful of operations training and evaluation need.

    Attributes:
        kind: ``"bytes"``, ``"bpe"`` or ``"hf"`` (a local Hugging Face tokenizer).
        vocab_size: number of token ids, special tokens included.
        eos_id: the end-of-document token; ``bos_id``: beginning-of-document token or None.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        kind: str,
        eos_token: str,
        bos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.kind = kind
        self.eos_token = eos_token
        self.bos_token = bos_token
        # A Jinja chat template (Hugging Face's format), or None when the tokenizer has none.
        self.chat_template = chat_template
        # The JSON as given is what we store and save; the working copy below is adjusted for data.
        self._json = tokenizer_json
        self._hf = HFTokenizer.from_str(tokenizer_json)
        # A local tokenizer.json may truncate or pad (to a model's context): never cut documents.
        self._hf.no_truncation()
        self._hf.no_padding()
        self._hf.encode_special_tokens = True
        # One more than the largest id (not the token count): ids of added tokens may leave holes,
        # and an embedding table must still hold every id.
        self.vocab_size: int = max(self._hf.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id: int = self._token_id(eos_token)
        self.bos_id: int | None = self._token_id(bos_token) if bos_token is not None else None

    @cached_property
    def _hf_parsing_special(self) -> HFTokenizer:
        """A copy that reads special-token strings in the text as the special tokens (chat markup)."""
        hf = HFTokenizer.from_str(self._json)
        hf.no_truncation()
        hf.no_padding()
        hf.encode_special_tokens = False
        return hf

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (EOS, BOS, chat markers, ...): they cover no text."""
        return frozenset(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)

    def _token_id(self, token: str) -> int:
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise DataError(f"the tokenizer has no token {token!r}; use a tokenizer that defines it")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"

    @cached_property
    def adds_bos(self) -> bool:
        """True when the tokenizer's own post-processing puts ``bos_id`` in front of every text
        (what ``transformers`` does with ``add_special_tokens=True``)."""
        if self.bos_id is None:
            return False
        with_special = self._hf.encode("a", add_special_tokens=True).ids
        without = self._hf.encode("a", add_special_tokens=False).ids
        return with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    @property
    def fingerprint(self) -> str:
        """A sha256 naming exactly this tokenizer (for cache keys)."""
        identity = json.dumps([self.kind, self.eos_token, self.bos_token, self._json])
        return hashlib.sha256(identity.encode()).hexdigest()

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` alone: no special tokens added (what goes around a document is
        :func:`document_frame`'s job); special-token strings inside the text are encoded as plain text."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once, in parallel (the fast batch encoder: no offsets are computed)."""
        return [enc.ids for enc in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_with_offsets(
        self, text: str, *, parse_special: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, offsets)``: ``offsets[i]`` = (start, end) characters of ``text`` token ``i`` covers.

        ``parse_special``: read special-token strings in ``text`` as those tokens (for a rendered
        chat template, whose markers are special tokens) instead of as plain text (documents).
        """
        hf = self._hf_parsing_special if parse_special else self._hf
        encoding = hf.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def encode_with_bytes(self, text: str) -> tuple[list[int], list[int]]:
        """``(ids, nbytes)``: ``nbytes[i]`` = UTF-8 bytes of ``text`` token ``i`` covers; they sum to
        ``len(text.encode())`` whenever the text yields at least one token."""
        ids, counts = self.encode_batch_with_bytes([text])[0]
        return ids.tolist(), counts.tolist()

    def encode_batch_with_bytes(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`encode_with_bytes` for many texts, in parallel, as int64 numpy arrays."""
        encodings = self._hf.encode_batch(list(texts), add_special_tokens=False)
        return [
            (
                np.asarray(enc.ids, dtype=np.int64),
                token_byte_counts(text, enc.offsets, enc.special_tokens_mask),
            )
            for text, enc in zip(texts, encodings, strict=True)
        ]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; special tokens (EOS, BOS) are kept unless ``skip_special_tokens``."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, as JSON-friendly values (stored in checkpoints)."""
        return {
            "format": _DICT_FORMAT,
            "kind": self.kind,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "tokenizer_json": self._json,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Tokenizer:
        if state.get("format") != _DICT_FORMAT or "tokenizer_json" not in state:
            raise DataError("this stored tokenizer is from another version of nexttoken; re-save it")
        return cls(
            state["tokenizer_json"],
            kind=state["kind"],
            eos_token=state["eos_token"],
            bos_token=state["bos_token"],
            chat_template=state.get("chat_template"),  # absent from tokenizers stored before chat support
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` that ``transformers`` loads.

        The saved tokenizer puts :func:`document_start` in front of every text it encodes with
        special tokens (transformers' default), so whoever loads it (``AutoTokenizer``, ``nexttoken
        eval`` of an exported folder) starts documents exactly as this tokenizer's model was trained.
        The chat template, if any, goes into ``tokenizer_config.json`` (``apply_chat_template`` uses it).
        """
        from tokenizers import processors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        start = document_start(self)
        tokenizer_json, bos_token = self._json, self.bos_token
        if start is not None and not self.adds_bos:
            hf = HFTokenizer.from_str(self._json)
            token = self._hf.id_to_token(start)
            hf.post_processor = processors.TemplateProcessing(
                single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, start)]
            )
            tokenizer_json, bos_token = hf.to_str(), token
        write_atomically(directory / "tokenizer.json", tokenizer_json)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}
        if bos_token is not None:
            config["bos_token"] = bos_token
        config["clean_up_tokenization_spaces"] = False
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_atomically(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return directory


def document_start(tokenizer: Tokenizer) -> int | None:
    """The token put before every document, or None: THE rule, for training streams, evaluation,
    sampling and export alike (see the module docstring)."""
    if tokenizer.kind in BUILTIN_KINDS:
        return tokenizer.eos_id
    return tokenizer.bos_id if tokenizer.adds_bos else None


def describe_scored_start(tokenizer: Tokenizer, start: int | None, mode: str = "auto") -> str:
    """``document start: TOKEN (why)`` for scoring: what goes before each evaluated document (``start``,
    as the caller resolved it under ``mode``, auto/yes/no; without one the first token is not scored)
    and why, in one line. Training's stream is worded by :func:`nexttoken.data.chat.describe_document_start`
    (there, documents without a start token are still kept apart by the EOS) (the setting named with
    :func:`setting`, for a command to spell)."""
    bos = setting("bos")
    if start is None:
        if mode == "no":
            return f"document start: nothing ({bos} no: each document's first token is not scored)"
        return (
            "document start: nothing (the tokenizer adds no BOS, so each document's first token is not "
            f"scored; {bos} yes prepends one)"
        )
    token = tokenizer.eos_token if start == tokenizer.eos_id else tokenizer.bos_token
    if tokenizer.kind in BUILTIN_KINDS and start == tokenizer.eos_id:
        why = "nexttoken's tokenizer: the EOS that ends each training document starts the next"
    elif tokenizer.adds_bos and start == tokenizer.bos_id:
        why = "the tokenizer's BOS: it puts it before every text it encodes"
    else:
        why = f"{bos} yes: the tokenizer's BOS, which it does not add itself"
    template = tokenizer.chat_template
    if template is not None and start == tokenizer.bos_id:
        writes = "bos_token" in template or (token is not None and token in template)
        why += "; its chat template " + ("writes one too" if writes else "does not add one")
    return f"document start: {token} ({why})"


def document_frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """``(before, after)``: the tokens around each document's own tokens in a training stream.

    ``before`` is :func:`document_start`; ``after`` is the EOS unless the EOS already starts the
    next document, so consecutive documents are always separated.
    """
    start = document_start(tokenizer)
    before = [] if start is None else [start]
    after = [] if start == tokenizer.eos_id else [tokenizer.eos_id]
    return before, after


# --------------------------------------------------------------------------- building
def bytes_tokenizer() -> Tokenizer:
    """UTF-8 bytes: token id == byte value, ``<|endoftext|>`` = 256, ``<|im_start|>`` = 257,
    ``<|im_end|>`` = 258."""
    vocab = {char: byte for byte, char in enumerate(_gpt2_byte_alphabet())}
    tok = _byte_level(models.BPE(vocab=vocab, merges=[]), split_words=False)
    tok.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return Tokenizer(tok.to_str(), kind="bytes", eos_token=EOS_TOKEN, chat_template=CHATML_TEMPLATE)


def train_bpe(training_texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` ids (fewer if the text runs out of pairs to merge)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + {', '.join(SPECIAL_TOKENS)}), "
            f"got {vocab_size}"
        )
    texts = list(training_texts)
    if not any(texts):
        raise DataError("cannot train a BPE tokenizer on no text; give the training split some text")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte representable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return Tokenizer(tok.to_str(), kind="bpe", eos_token=EOS_TOKEN, chat_template=CHATML_TEMPLATE)


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # transformers writes AddedToken as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(config: dict, folder: Path) -> str | None:
    """The chat template saved beside a tokenizer: ``chat_template.jinja`` (what transformers writes
    now) or the ``chat_template`` of ``tokenizer_config.json`` (a string, or named templates)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    return _single_template(config.get("chat_template"))


def _single_template(template: Any) -> str | None:
    """A template string from what transformers stores: a string, or a list/dict of named templates
    (the one named ``default`` is the chat template)."""
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def load_local_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A local Hugging Face tokenizer: a folder with ``tokenizer.json`` (and maybe a
    ``tokenizer_config.json`` naming its eos/bos tokens and chat template), a ``tokenizer.json`` file, or
    the tokenizer that a GGUF model file or a nexttoken checkpoint carries."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_tokenizer(path)
    if path.suffix == ".ckpt" and path.is_file():
        from nexttoken.checkpoints import read_checkpoint

        checkpoint = read_checkpoint(path)
        if "tokenizer" not in checkpoint:
            raise DataError(f"checkpoint {path} carries no tokenizer; pass {setting('data.tokenizer')}")
        return Tokenizer.from_dict(checkpoint["tokenizer"])
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"tokenizer {str(path)!r} is not 'bytes', 'bpe', or a local tokenizer.json file or folder holding "
            f"one; check {setting('data.tokenizer')}"
        )
    try:
        tokenizer_json = file.read_text(encoding="utf-8")
        hf = HFTokenizer.from_str(tokenizer_json)
    except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
        raise DataError(
            f"{file} is not a readable tokenizer.json ({e}); check {setting('data.tokenizer')}"
        ) from None
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    vocab = hf.get_vocab(with_added_tokens=True)

    def pick(key: str, candidates: Sequence[str]) -> str | None:
        named = _config_token(config, key)
        if named is not None and named in vocab:
            return named
        return next((c for c in candidates if c in vocab), None)

    eos = pick("eos_token", _EOS_CANDIDATES)
    if eos is None:
        raise DataError(
            f"tokenizer {file} has no end-of-document token (no eos_token in tokenizer_config.json and none "
            f"of {', '.join(_EOS_CANDIDATES)}); add one, or use {setting('data.tokenizer')} bpe"
        )
    return Tokenizer(
        tokenizer_json,
        kind="hf",
        eos_token=eos,
        bos_token=pick("bos_token", _BOS_CANDIDATES),
        chat_template=_chat_template_of(config, file.parent),
    )


def _gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer stored inside a GGUF model file, read through transformers' GGUF support."""
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as e:  # transformers raises many kinds here; all mean "not readable"
        raise DataError(
            f"could not read a tokenizer from {path} ({e}); check {setting('data.tokenizer')}"
        ) from None
    return from_transformers(fast, str(path))


def from_transformers(fast: Any, source: str = "the model") -> Tokenizer:
    """A ``transformers`` fast tokenizer as a nexttoken :class:`Tokenizer` (same vocabulary, same
    special tokens, same post-processing, same chat template)."""
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            f"the tokenizer of {source} has no fast (Rust) version; save it with a tokenizer.json "
            "(AutoTokenizer.from_pretrained(..., use_fast=True) converts most slow tokenizers)"
        )
    if fast.eos_token is None:
        raise DataError(
            f"the tokenizer of {source} has no end-of-document token; use {setting('data.tokenizer')} bpe"
        )
    return Tokenizer(
        backend.to_str(),
        kind="hf",
        eos_token=fast.eos_token,
        bos_token=fast.bos_token,
        chat_template=_single_template(getattr(fast, "chat_template", None)),
    )


def as_tokenizer(tokenizer: Tokenizer | Any) -> Tokenizer:
    """A nexttoken :class:`Tokenizer` as it is; a ``transformers`` fast tokenizer converted."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else from_transformers(tokenizer)


def _bpe_cache_file(cache_dir: Path, training_texts: list[str], vocab_size: int) -> Path:
    key = json.dumps(
        {
            "kind": "bpe",
            "vocab_size": vocab_size,
            "special_tokens": list(SPECIAL_TOKENS),
            "content": content_digest(training_texts),
            # A different library version may train differently: don't reuse across versions.
            "tokenizers": tokenizers.__version__,
        },
        sort_keys=True,
    )
    return Path(cache_dir) / f"bpe-{vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def build_tokenizer(
    kind: str,
    training_texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: Path | None = None,
) -> Tokenizer:
    """Build or load a tokenizer: ``"bytes"``, ``"bpe"`` (trained on ``training_texts``, cached in
    ``cache_dir`` by content, vocabulary size and kind), or a path to a local HF tokenizer."""
    if kind == "bytes":
        return bytes_tokenizer()
    if kind == "bpe":
        if training_texts is None:
            raise DataError("the bpe tokenizer is trained on the corpus: pass training_texts")
        texts = list(training_texts)
        if cache_dir is None:
            return train_bpe(texts, vocab_size)
        cached = _bpe_cache_file(Path(cache_dir), texts, vocab_size)
        if cached.is_file():
            return Tokenizer.from_dict(json.loads(cached.read_text(encoding="utf-8")))
        tokenizer = train_bpe(texts, vocab_size)
        write_atomically(cached, json.dumps(tokenizer.to_dict()))
        return tokenizer
    return load_local_tokenizer(kind)
