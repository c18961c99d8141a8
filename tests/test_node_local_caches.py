"""Node-local disks: each machine builds its own cache, and every machine gets the same key and the
same bytes (the key rank 0 hands the others must name the same files everywhere)."""

import json

import pytest

from nexttoken.data.datamodule import TextDataModule
from test_datamodule import write_corpus
from test_sft_cache import write_chats

HOW_IT_WAS_BUILT = ("seconds", "workers")  # meta.json's record of the build, not of the data


def build(corpus, cache_dir, workers: int) -> tuple[str, dict[str, bytes], dict]:
    data = TextDataModule(
        path=str(corpus), tokenizer="bpe", vocab_size=300, block_size=64, cache_dir=str(cache_dir),
        num_workers=workers,
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    assert not data.cache_hit  # built here, not found
    folder = cache_dir / data._cache_key
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    meta = json.loads(files.pop("meta.json"))
    return data._cache_key, files, {k: v for k, v in meta.items() if k not in HOW_IT_WAS_BUILT}


@pytest.mark.parametrize("kind", ["tokens", "examples"])
def test_two_machines_build_the_same_cache_on_their_own_disks(tmp_path, kind):
    if kind == "tokens":
        corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    else:
        corpus = write_chats(tmp_path / "chats" / "chats.jsonl", 40)
    # Machine a tokenizes in its one process, machine b with 2 worker processes.
    key_a, files_a, meta_a = build(corpus, tmp_path / "node-a", workers=0)
    key_b, files_b, meta_b = build(corpus, tmp_path / "node-b", workers=2)
    assert key_a == key_b and key_a.startswith(f"{kind}/")
    assert files_a.keys() == files_b.keys() and len(files_a) >= 4
    for name, content in files_a.items():
        assert content == files_b[name], name
    assert meta_a == meta_b  # the same tokenizer (a BPE trained on each machine) and counts
