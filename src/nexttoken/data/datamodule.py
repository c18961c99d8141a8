"""TextDataModule: a corpus, tokenized once into cached memmaps, served as next-token blocks.

Life of the data:

1. ``prepare_data`` (Lightning calls it on the first process of each machine): find the sources
   (text files, JSON Lines/JSON/Parquet records, saved ``datasets`` folders), split train/val,
   build the tokenizer (a BPE is trained on a bounded sample of the training split), and tokenize
   the corpus once, streaming, with ``num_workers`` processes, into ``.npy`` token streams under the
   cache folder, keyed by the corpus's content and the tokenizer. A second run finds the files and
   starts at once; a lock beside the cache folder lets one process build it while others wait.
2. ``setup`` (every process): the other processes take the cache's key from rank 0 and read the
   finished cache; they never read or tokenize the corpus themselves.
3. ``train_dataloader``: batches ``(input_ids, targets)`` of blocks read from the memmap in a seeded
   per-epoch order; each rank reads its own blocks. The loader remembers how far into the epoch's
   global order the run is, so a run resumed from a mid-epoch checkpoint (also with another number
   of processes that keeps the global batch) sees exactly the blocks an uninterrupted run would have.
4. ``val_dataloader``: batches ``(input_ids, targets, n_bytes)`` that score every held-out token
   exactly once, for any batch size and any number of ranks (no padding samples, no repeats): the
   held-out stream's first ``val_tokens`` targets by default (:data:`DEFAULT_VAL_TOKENS`), all of
   them with ``val_tokens="all"``.

Chat and instruction records (``data.format``, chosen from the records' fields by default) take
another path from step 1 on: their examples are encoded, masked and cached by
:mod:`nexttoken.data.sft_cache`, and served packed or padded by the example loaders of
:mod:`nexttoken.data.loaders`; this module only dispatches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from nexttoken.data.cache import CACHE_FORMAT, CHUNK_CHARS, TokenCache, cached_json, progress_bar
from nexttoken.data.chat import (
    ChatTemplate,
    DataFormat,
    DocumentStart,
    TrainOn,
    describe_document_start,
    resolve_chat_template,
)
from nexttoken.data.contamination import (
    CheckedCorpus,
    CorpusChecks,
    corpus_checks,
    discard_checks,
    duplicate_lines,
    held_out_token_share,
    overlap_lines,
)
from nexttoken.data.corpus import Corpus
from nexttoken.data.documents import default_corpus, find_documents
from nexttoken.data.formats import choose_data_format
from nexttoken.data.loaders import (
    ExampleTrainBatches,
    ExampleValBatches,
    FirstExamples,
    ResumableDataLoader,
    TrainBatches,
    ValBatches,
)
from nexttoken.data.overlap import DEFAULT_N
from nexttoken.data.packing import num_train_blocks
from nexttoken.data.parallel import available_cores
from nexttoken.data.preferences import PairSet, PairTrainBatches, PairValBatches
from nexttoken.data.sft import ExampleCounts, Truncation, count_examples
from nexttoken.data.sft_cache import (
    ExampleData,
    example_cache_key,
    get_or_build_examples,
    open_example_cache,
)
from nexttoken.data.tokenizers import Tokenizer, build_tokenizer, document_start
from nexttoken.errors import DataError, setting
from nexttoken.io import default_cache_dir

log = logging.getLogger(__name__)

# Below this much source data, tokenizing in this process is done before workers would have started.
SMALL_CORPUS_BYTES = 4 * CHUNK_CHARS
# Held-out tokens one validation scores by default (``data.val_tokens``). The default run (800 steps
# of 16 x 256 tokens, a validation every 200) validated 330k tokens in 13 s per pass on this project's
# 2-core CPU (README: 4 passes in 53 s, ~25k tokens/s forward, against ~14k tokens/s training, 240 s
# of steps): 250k tokens is ~10 s, ~4% of that run, and ~0.9 MB of text with the default BPE.
# Without a cap, 5% of a 2 GB corpus is ~100M tokens held out: hours per validation here.
DEFAULT_VAL_TOKENS = 250_000


class TextDataModule(L.LightningDataModule):
    """Train and validate on a corpus of text files and/or records.

    Args:
        path: text files, record files (``.jsonl``, ``.json``, either maybe ``.gz``/``.zst``;
            ``.parquet``) and saved ``datasets`` folders, or folders holding them (searched
            recursively); default: the Python standard library's own source, which needs no download.
        tokenizer: ``bytes``, ``bpe`` (trained on the training split) or a local HF tokenizer path.
        vocab_size: BPE vocabulary size (ignored by other tokenizers).
        block_size: tokens of context per training example.
        batch_size: training blocks per batch (per rank); ``val_batch_size`` defaults to it. The
            global batch is ``batch_size x trainer.accumulate_grad_batches x processes``; a resumed run
            keeps it, and then continues the epoch's order with any number of processes.
        val_fraction: share of documents held out for validation (of bytes, for a one-file corpus);
            a saved ``DatasetDict``'s own ``validation`` (or ``test``) split is used instead.
        val_path: explicit validation sources instead of a held-out fraction.
        val_tokens: the held-out tokens one validation scores: the first this many targets of the
            held-out token stream (documents in corpus order), so a validation costs the same on any
            corpus; ``all``: every held-out token. The split itself does not depend on it.
            Chat/instruction validation scores whole held-out examples, in order, while their
            response tokens stay within it (at least one example).
        include, exclude: glob patterns filtering the files found in folders.
        cache_dir: where tokenized corpora and tokenizers are cached; default ``$NEXTTOKEN_CACHE``
            or ``~/.cache/nexttoken``. Put it on a shared filesystem to tokenize once for all machines.
        num_workers: processes that tokenize the corpus; default: the machine's cores (a corpus
            under 4 MB: this process). 0 tokenizes in this process.
        seed: seeds the per-epoch shuffle of training blocks.
        replace_invalid_utf8: replace undecodable bytes with U+FFFD (with a warning) instead of failing.
        text_field: the field of each record that holds its text; a dotted path for a nested field.
        loader_workers: DataLoader worker processes reading batches during training (0: in the
            training process, which is enough for memory-mapped blocks).
        bpe_sample_mb: the BPE tokenizer is trained on a uniform, seeded sample of this many
            megabytes (10^6 bytes) of the training split, or all of it when it is smaller.
        format: ``auto`` (text files are text; records go by their fields: ``messages`` is chat,
            ``prompt`` + ``response`` or ``instruction`` + ``output`` is instruction, ``chosen`` +
            ``rejected`` is preference pairs), ``text``, ``chat``, ``instruction`` or ``preference``.
        chat_template: a Jinja chat template file for chat/instruction data; default: the
            tokenizer's own (ChatML for ``bytes`` and ``bpe``).
        train_on: chat/instruction tokens the loss scores: every assistant reply and its end-of-turn
            token (``responses``), only the last reply (``last_response``), or ``all``.
        truncation: an example longer than ``block_size`` loses its oldest tokens (``left``) or
            is dropped (``drop``); either way the count is reported.
        packing: chat/instruction data: several examples per row of ``block_size``, with attention
            and positions kept apart per example; false: one example per row, padded to the longest
            in its batch. (Plain text is always cut into full blocks.)
        document_mask: plain text: attention stops at document boundaries inside a block and
            positions restart at each document (chat examples are kept apart by ``packing``).
        shift_blocks: plain text: every epoch after the first cuts the training blocks at a new
            seeded offset (0 .. ``block_size`` - 1), so a run of many epochs over a small corpus
            does not see the same windows each time; false: the same blocks every epoch.
        overlap_n: plain text: the held-out documents' overlap with the training split is measured in
            word n-grams of this length before tokenizing (:mod:`nexttoken.data.contamination`);
            0: not measured.
        decontaminate: drop the held-out documents (paragraphs, for a one-file corpus) that share an
            ``overlap_n``-gram with the training split.
        dedup: keep one of each set of training documents whose normalised text is the same.
    """

    def __init__(
        self,
        path: str | list[str] | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_fraction: float = 0.05,
        val_path: str | list[str] | None = None,
        val_tokens: int | Literal["all"] = DEFAULT_VAL_TOKENS,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        cache_dir: str | None = None,
        num_workers: int | None = None,
        seed: int = 1337,
        replace_invalid_utf8: bool = False,
        text_field: str = "text",
        loader_workers: int = 0,
        bpe_sample_mb: float = 64.0,
        format: DataFormat = "auto",
        chat_template: str | None = None,
        train_on: TrainOn = "responses",
        truncation: Truncation = "left",
        packing: bool = True,
        document_mask: bool = False,
        shift_blocks: bool = True,
        overlap_n: int = DEFAULT_N,
        decontaminate: bool = False,
        dedup: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"{name} must be a positive integer, got {value}")
        if val_batch_size is not None and val_batch_size < 1:
            raise DataError(f"val_batch_size must be a positive integer, got {val_batch_size}")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be 0 or more (or unset: one per core), got {num_workers}")
        if loader_workers < 0:
            raise DataError(f"loader_workers must be 0 or more, got {loader_workers}")
        if not bpe_sample_mb > 0:
            raise DataError(f"bpe_sample_mb must be positive, got {bpe_sample_mb}")
        if not text_field:
            raise DataError(f"{setting('data.text_field')} must name a field, e.g. text")
        if val_tokens != "all" and (
            isinstance(val_tokens, bool) or not isinstance(val_tokens, int) or val_tokens < 1
        ):
            raise DataError(
                f"{setting('data.val_tokens')} must be a positive number of held-out tokens, or all "
                f"(every one), got {val_tokens!r}"
            )
        if isinstance(overlap_n, bool) or not isinstance(overlap_n, int) or overlap_n < 0:
            raise DataError(
                f"{setting('data.overlap_n')} must be a whole number of words (0: no overlap check), got "
                f"{overlap_n!r}"
            )
        if decontaminate and overlap_n == 0:
            raise DataError(
                f"{setting('data.decontaminate')} drops held-out documents that share n-grams with training, "
                f"which {setting('data.overlap_n')} 0 does not look for; give {setting('data.overlap_n')} 1 or more"
            )
        self.save_hyperparameters(logger=False)  # the run config is saved by the CLI; avoids clashing keys
        # With more ranks than validation blocks some rank has no batch; that is correct (each
        # block is scored once, and the metrics are summed over ranks), so let Lightning accept it.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        # Filled in by prepare_data()/setup().
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.train_tokens: int | None = None
        self.val_tokens: int | None = None
        self.val_bytes: int | None = None
        self.cache_hit: bool | None = None
        self.cache: TokenCache | None = None
        self.examples: ExampleData | None = None  # chat/instruction data instead of a token cache
        self.data_format: str | None = None
        self.format_line: str | None = None  # what data.format chose, for the start summary
        self.checks: CorpusChecks | None = None  # overlap and duplicates (plain text; rank 0 of each machine)
        self._cache_key: str | None = None  # the cache folder under cache_root: tokens/KEY or examples/KEY
        self._set_up = False
        self._scored_val_examples: int | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._pending_train_state: dict[str, Any] | None = None
        self._trust: tuple[list[str], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ building
    @property
    def cache_root(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else default_cache_dir()

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Read the cache that ``prepare_data`` built, by the key rank 0 computed (other ranks never
        read the corpus); build it here only if it is not there (e.g. no ``prepare_data`` ran)."""
        if self._set_up:
            return
        key = self._cache_key
        if self.trainer is not None:  # every rank takes part: it is a collective
            key = self.trainer.strategy.broadcast(key, src=0)
        if self.cache is None and self.examples is None:
            examples = open_example_cache(self.cache_root / key) if key else None
            cache = TokenCache(self.cache_root / key) if key else None
            if examples is not None:
                self._use_examples(examples)
            elif cache is not None and cache.exists():
                self._use(cache, cache.read_meta(), built=False)
            else:
                self._build()
        self._set_up = True

    def corpus(self) -> Corpus:
        """The corpus these settings name, split into training and validation documents."""
        hp = self.hparams
        if hp.path:
            sources = find_documents(hp.path, hp.include, hp.exclude)
        else:
            sources = find_documents(default_corpus(hp.include, hp.exclude))
        val_sources = (
            find_documents(hp.val_path, hp.include, hp.exclude, setting_name="data.val_path")
            if hp.val_path
            else None
        )
        errors = "replace" if hp.replace_invalid_utf8 else "strict"
        return Corpus(sources, hp.val_fraction, val_sources, errors=errors, text_field=hp.text_field)

    def _build(self) -> None:
        """Tokenize the corpus into the cache (or encode its conversations into the example cache),
        or find it there. Idempotent."""
        if self.cache is not None or self.examples is not None:
            return
        corpus = self.corpus()
        self.data_format, self.format_line = choose_data_format(
            corpus.train_paths, self.hparams.format, self.hparams.text_field
        )
        if self.data_format == "text":
            self._build_tokens(corpus)
        else:
            self._build_examples(corpus)

    def _tokenizer_spec(self) -> tuple[Tokenizer | None, Any]:
        """``(tokenizer, what names it in a cache key)``; no tokenizer for a BPE still to be trained."""
        hp = self.hparams
        if hp.tokenizer == "bpe":
            # A BPE is a function of the training split and these settings: key it by them, so a
            # cached corpus is found without training (or sampling) anything.
            return None, ["bpe", hp.vocab_size, self._bpe_sample_bytes, _tokenizers_version()]
        given = build_tokenizer(hp.tokenizer)
        return given, given.fingerprint

    def _build_tokens(self, corpus: Corpus) -> None:
        hp = self.hparams
        given, spec = self._tokenizer_spec()
        identity = corpus.identity()
        made_root = not self.cache_root.exists()
        self.checks, checks_built = corpus_checks(
            corpus, hp.overlap_n, self.cache_root, identity, workers=self._tokenizing_workers(corpus)
        )
        try:
            self._build_checked_tokens(corpus, identity, given, spec)
        except BaseException:
            if checks_built:
                discard_checks(self.cache_root, self.checks.key, made_root)
            raise

    def _build_checked_tokens(
        self, corpus: Corpus, identity: str, given: Tokenizer | None, spec: Any
    ) -> None:
        hp = self.hparams
        if (
            hp.decontaminate
            and self.checks.held_out_units
            and self.checks.overlap_units == self.checks.held_out_units
        ):
            raise DataError(
                f"every one of the {self.checks.held_out_units:,} held-out {self.checks.unit}s shares "
                f"{hp.overlap_n}-grams with the training split, so {setting('data.decontaminate')} would leave no "
                f"validation text; hold out other text with {setting('data.val_path')}, or raise "
                f"{setting('data.overlap_n')}"
            )
        drops = self.checks.key_part(hp.dedup, hp.decontaminate)
        # Nothing dropped: the corpus's own key (so caches built before these checks are still found).
        key = json.dumps([CACHE_FORMAT, identity, spec, *([drops] if drops else [])])
        self._cache_key = "tokens/" + hashlib.sha256(key.encode()).hexdigest()[:24]
        cache = TokenCache(self.cache_root / self._cache_key)
        source = CheckedCorpus(corpus, self.checks, hp.dedup, hp.decontaminate) if drops else corpus
        meta, built = cache.get_or_build(
            source,
            lambda: given or self._train_bpe(corpus),
            workers=self._tokenizing_workers(corpus),
            check=self._check_sizes,  # a corpus too small to train on leaves no cache entry behind
        )
        if built:
            log.info(
                "tokenized %s + %s documents (%.1f MB) into %s + %s tokens in %.1f s with %s (cached in %s)",
                f"{meta['train_documents']:,}",
                f"{meta['val_documents']:,}",
                (meta["train_text_bytes"] + meta["val_bytes"]) / 1e6,
                f"{meta['train_tokens']:,}",
                f"{meta['val_tokens']:,}",
                meta["seconds"],
                f"{meta['workers']} worker processes" if meta["workers"] else "this process",
                cache.directory,
            )
        self._use(cache, meta, built)

    def _build_examples(self, corpus: Corpus) -> None:
        hp = self.hparams
        if hp.document_mask:
            raise DataError(
                f"{setting('data.document_mask')} applies to plain text; {self.data_format} examples are kept "
                f"apart by {setting('data.packing')} (on by default); drop {setting('data.document_mask')}"
            )
        given, spec = self._tokenizer_spec()
        # Checked before any record is read. A BPE to be trained has the special tokens and the
        # ChatML template of the bytes tokenizer: check the template against that.
        template = resolve_chat_template(given or build_tokenizer("bytes"), hp.chat_template)
        settings = {
            "format": self.data_format,
            "train_on": hp.train_on,
            "block_size": hp.block_size,
            "truncation": hp.truncation,
        }
        self._cache_key = "examples/" + example_cache_key(
            corpus.identity(), spec, template.template, settings
        )
        examples = get_or_build_examples(
            self.cache_root / self._cache_key,
            corpus,
            fmt=self.data_format,
            template=template,
            tokenizer=given,
            train_on=hp.train_on,
            block_size=hp.block_size,
            truncation=hp.truncation,
            vocab_size=hp.vocab_size,
            bpe_sample_bytes=self._bpe_sample_bytes,
            workers=self._tokenizing_workers(corpus),
        )
        self._use_examples(examples)

    def _use_examples(self, examples: ExampleData) -> None:
        self.examples = examples
        self.data_format = examples.meta["data_format"]
        self.tokenizer = examples.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.cache_hit = not examples.built

    @property
    def _bpe_sample_bytes(self) -> int:
        return int(self.hparams.bpe_sample_mb * 1e6)

    def _train_bpe(self, corpus: Corpus) -> Tokenizer:
        started = time.perf_counter()
        bar = progress_bar(corpus.size(), "sampling text for BPE")
        try:
            texts = corpus.sample(self._bpe_sample_bytes, on_read=bar.update)
        finally:
            bar.close()
        # Not cached on its own: the token cache entry, keyed by what determines the BPE, keeps it.
        tokenizer = build_tokenizer("bpe", texts, self.hparams.vocab_size)
        log.info(
            "BPE tokenizer (%s tokens) from %.1f MB of the training split in %.1f s",
            f"{tokenizer.vocab_size:,}",
            sum(len(t.encode("utf-8")) for t in texts) / 1e6,
            time.perf_counter() - started,
        )
        return tokenizer

    def _tokenizing_workers(self, corpus: Corpus) -> int:
        if self.hparams.num_workers is not None:
            return self.hparams.num_workers
        return 0 if corpus.size() <= SMALL_CORPUS_BYTES else available_cores()

    def _use(self, cache: TokenCache, meta: dict[str, Any], built: bool) -> None:
        self._check_sizes(meta)
        self.tokenizer = Tokenizer.from_dict(meta["tokenizer"])
        self.vocab_size = self.tokenizer.vocab_size
        self.train_tokens = meta["train_tokens"]
        self.val_tokens = meta["val_tokens"]
        self.val_bytes = meta["val_bytes"]
        self.cache_hit = not built
        self.cache = cache

    def _check_sizes(self, meta: dict[str, Any]) -> None:
        needed = self.hparams.block_size + 1
        if meta["train_tokens"] < needed:
            raise DataError(
                f"the training split has {meta['train_tokens']} tokens, but block_size "
                f"{self.hparams.block_size} needs at least {needed}; add text or lower "
                f"{setting('data.block_size')}"
            )
        if meta["val_tokens"] < 2:
            raise DataError(
                f"the validation split has {meta['val_tokens']} tokens, at least 2 are needed; raise "
                f"{setting('data.val_fraction')} or pass {setting('data.val_path')}"
            )

    # ------------------------------------------------------------------ can the score be trusted
    def document_start_description(self) -> DocumentStart:
        """What starts each document, with the chat template this data is rendered with (chat data) or
        the tokenizer's own (plain text), in :func:`~nexttoken.data.chat.describe_document_start`'s words."""
        template = None
        if self.examples is not None:
            template = resolve_chat_template(self.tokenizer, self.hparams.chat_template)
        elif self.tokenizer.chat_template:
            template = ChatTemplate(
                self.tokenizer, self.tokenizer.chat_template, "the tokenizer's chat template"
            )
        return describe_document_start(self.tokenizer, template, chat_examples=self.examples is not None)

    def trust_report(self) -> tuple[list[str], dict[str, Any]]:
        """The lines the start summary and the report give on whether the held-out score can be trusted
        (the held-out text's overlap with training, exact duplicates in training, what starts a
        document) and their numbers, for ``report.json``. Computed once."""
        if self._trust is not None:
            return self._trust
        hp = self.hparams
        lines: list[str] = []
        numbers: dict[str, Any] = {}
        if self.examples is not None:
            lines.append(
                "overlap and duplicates: not measured for chat/instruction data (only plain text is checked; "
                "`nexttoken overlap TRAIN EVAL` measures records' text)"
            )
            numbers["overlap"] = {"measured": False, "reason": "chat/instruction data"}
        elif self.checks is not None:
            tokens = None
            if self.checks.measured is None and not hp.decontaminate and self.cache is not None:
                tokens = self._overlap_tokens(self.checks)
            overlap, numbers["overlap"] = overlap_lines(self.checks, tokens, hp.decontaminate)
            duplicates, numbers["duplicates"] = duplicate_lines(self.checks, hp.dedup)
            lines += overlap + duplicates
        start = self.document_start_description()
        numbers["document_start"] = start.to_dict()
        lines += [start.line, *([start.warning] if start.warning else [])]
        self._trust = lines, numbers
        return self._trust

    def _overlap_tokens(self, checks: CorpusChecks) -> tuple[int, int] | None:
        """``(covered, held-out tokens)`` (:func:`~nexttoken.data.contamination.held_out_token_share`),
        kept beside the token cache."""
        cache = self._require_setup()

        def compute() -> list[int] | None:
            share = held_out_token_share(checks, np.load(cache.val_bytes, mmap_mode="r"))
            return list(share) if share is not None else None

        share = cached_json(cache, f"overlap_tokens-{checks.key}.json", compute)
        return tuple(share) if share is not None else None

    def _require_setup(self) -> TokenCache:
        if self.cache is None:
            if self.examples is not None:
                raise RuntimeError("chat/instruction data has no token streams; use .examples")
            raise RuntimeError("call prepare_data() and setup() before asking for data")
        return self.cache

    @property
    def val_targets(self) -> int:
        """Validation targets held out: every val stream position after the first."""
        return self.val_tokens - 1

    @property
    def scored_val_targets(self) -> int:
        """The targets one validation scores: the first ``val_tokens`` of :attr:`val_targets`, or all."""
        cap = self.hparams.val_tokens
        return self.val_targets if cap == "all" else min(cap, self.val_targets)

    def _scored_byte_range(self) -> tuple[int, int]:
        """``(start, stop)`` in ``val.txt`` of the text the scored targets cover (stream positions
        ``1 .. scored_val_targets``): every token's bytes follow the previous token's."""
        counts = np.load(self._require_setup().val_bytes, mmap_mode="r")
        start = int(counts[0])
        return start, start + int(counts[1 : self.scored_val_targets + 1].sum(dtype=np.int64))

    @property
    def scored_val_bytes(self) -> int:
        """UTF-8 bytes of the text one validation scores (its bits per byte divide by them)."""
        start, stop = self._scored_byte_range()
        return stop - start

    def scored_val_examples(self) -> int:
        """Chat/instruction data: how many held-out examples one validation scores, the first ones
        in the held-out order, whole, while their response tokens stay within ``data.val_tokens``
        (at least one example); all of them with ``val_tokens="all"``."""
        if self._scored_val_examples is None:
            examples, cap = self.examples.val, self.hparams.val_tokens
            self._scored_val_examples = len(examples)
            scored = 0
            for count, example in enumerate(examples if cap != "all" else ()):
                scored += example.n_scored
                if scored > cap:
                    self._scored_val_examples = max(count, 1)
                    break
            if self.data_format == "preference":  # whole pairs: a pair is two consecutive examples
                self._scored_val_examples += self._scored_val_examples % 2
        return self._scored_val_examples

    def scored_val_counts(self) -> ExampleCounts:
        """The make-up of the held-out examples one validation scores (:meth:`scored_val_examples`):
        its response tokens and their bytes are exactly what the validation's numbers divide by."""
        if self.scored_val_examples() == len(self.examples.val):
            return self.examples.counts("val")
        return count_examples(FirstExamples(self.examples.val, self.scored_val_examples()))

    def val_text_bytes(self) -> bytes:
        """The raw held-out text (UTF-8), all of it."""
        return self._require_setup().val_text.read_bytes()

    def scored_val_text(self) -> bytes:
        """The held-out text one validation scores (UTF-8; only it is read), e.g. to compare with
        gzip/xz bits per byte on the same bytes."""
        start, stop = self._scored_byte_range()
        with open(self._require_setup().val_text, "rb") as f:
            f.seek(start)
            return f.read(stop - start)

    # ------------------------------------------------------------------ loaders
    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _document_mask(self) -> tuple[int | None, int] | None:
        """``(start_id, end_id)`` of the token streams' document framing, with ``data.document_mask``."""
        if not self.hparams.document_mask:
            return None
        return document_start(self.tokenizer), self.tokenizer.eos_id

    def _accumulate(self) -> int:
        """Batches per optimizer step (``trainer.accumulate_grad_batches``): an epoch is whole steps."""
        return self.trainer.accumulate_grad_batches if self.trainer is not None else 1

    def make_train_loader(
        self, rank: int = 0, world_size: int = 1, accumulate: int = 1
    ) -> ResumableDataLoader:
        if self.examples is not None:
            return self._example_train_loader(rank, world_size, accumulate)
        cache = self._require_setup()
        hp = self.hparams
        num_blocks = num_train_blocks(self.train_tokens, hp.block_size)
        if num_blocks < world_size * accumulate:
            raise DataError(
                f"the training split has {num_blocks} blocks of {hp.block_size} tokens, fewer than the "
                f"{world_size} processes x {accumulate} accumulated batches; add text or lower "
                f"{setting('data.block_size')}"
            )
        dataset = TrainBatches(
            cache.train,
            hp.block_size,
            hp.batch_size,
            hp.seed,
            rank,
            world_size,
            document_mask=self._document_mask(),
            accumulate=accumulate,
            shift_blocks=hp.shift_blocks,
        )
        return ResumableDataLoader(dataset, num_workers=hp.loader_workers)

    def _example_train_loader(self, rank: int, world_size: int, accumulate: int) -> ResumableDataLoader:
        hp = self.hparams
        examples = self.examples.train
        batches = ExampleTrainBatches
        if self.data_format == "preference":  # pairs stored as consecutive examples
            examples, batches = PairSet(examples), PairTrainBatches
        try:
            dataset = batches(
                examples,
                hp.block_size,
                hp.batch_size,
                hp.seed,
                packing=hp.packing,
                pad_id=self.tokenizer.eos_id,
                rank=rank,
                world_size=world_size,
                accumulate=accumulate,
            )
        except ValueError:  # fewer rows than processes
            raise DataError(
                f"the training split has {len(examples):,} examples, too few to give each of the {world_size} "
                f"processes {accumulate} batch(es) per step; add records or use fewer processes"
            ) from None
        return ResumableDataLoader(dataset, num_workers=hp.loader_workers)

    def make_val_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        hp = self.hparams
        if self.examples is not None:
            settings = dict(
                packing=hp.packing, pad_id=self.tokenizer.eos_id, rank=rank, world_size=world_size
            )
            batch_size, scored = hp.val_batch_size or hp.batch_size, self.scored_val_examples()
            if self.data_format == "preference":
                pairs = PairSet(FirstExamples(self.examples.val, scored))
                dataset = PairValBatches(pairs, hp.block_size, batch_size, **settings)
            else:
                dataset = ExampleValBatches(
                    self.examples.val, hp.block_size, batch_size, max_examples=scored, **settings
                )
        else:
            cache = self._require_setup()
            dataset = ValBatches(
                cache.val,
                cache.val_bytes,
                hp.block_size,
                hp.val_batch_size or hp.batch_size,
                pad_id=self.tokenizer.eos_id,
                rank=rank,
                world_size=world_size,
                document_mask=self._document_mask(),
                max_targets=self.scored_val_targets,
            )
        # An IterableDataset: Lightning never injects a (padding) DistributedSampler into it.
        return DataLoader(dataset, batch_size=None, num_workers=hp.loader_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        loader = self.make_train_loader(*self._rank_and_world_size(), self._accumulate())
        # A reloaded loader continues where the previous one (or the checkpoint) left off.
        state = self._pending_train_state
        if state is None and self._train_loader is not None:
            state = self._train_loader.state_dict()
        if state is not None:
            loader.load_state_dict(state)
            if self._pending_train_state is not None:
                self._count_batches_in_this_split(state.get("split", {}).get("accumulate"))
        self._pending_train_state = None
        self._train_loader = loader
        return loader

    def _count_batches_in_this_split(self, saved_accumulate: int | None) -> None:
        """A checkpoint resumed with another accumulation: Lightning's restored batch counts are in
        the saved run's micro-batches, and they decide when this run steps the optimizer, validates
        and ends the epoch. The same optimizer steps are ``accumulate / saved_accumulate`` times as
        many micro-batches here (the loader is there already: the same position in the global order)."""
        accumulate = self._accumulate()
        if self.trainer is None or not saved_accumulate or saved_accumulate == accumulate:
            return
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        for tracker in (progress.total, progress.current):
            for name in ("ready", "started", "processed", "completed"):
                setattr(tracker, name, getattr(tracker, name) * accumulate // saved_accumulate)

    def val_dataloader(self) -> DataLoader:
        return self.make_val_loader(*self._rank_and_world_size())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        if self._pending_train_state is not None:
            return {"train_loader": self._pending_train_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the loader's own state only when resuming mid-epoch; from an
        # end-of-epoch checkpoint it does not, and the loader would restart at epoch 0. The
        # datamodule's copy covers both cases (loading the same state twice is harmless).
        self._pending_train_state = state_dict.get("train_loader")
        if self._pending_train_state is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__
