"""The streamed corpus: one split rule for text files and records, the identity, the BPE sample."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nexttoken.data.corpus import _SAMPLE_SALT, Corpus
from nexttoken.data.documents import Document, find_documents, held_out, split_text, unit_hash
from nexttoken.errors import DataError


def write_jsonl(path: Path, texts: list[str], field: str = "text", compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def texts(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i}: " + "word " * (i % 7 + 1) + "\n" for i in range(n)]


def split(corpus: Corpus) -> tuple[list, list]:
    train, val = [], []
    for is_val, document in corpus.documents():
        (val if is_val else train).append(document)
    return train, val


def test_records_split_by_a_stable_hash_of_path_and_index(tmp_path):
    one = write_jsonl(tmp_path / "one" / "data" / "a.jsonl.zst", texts(200), compress=True)
    two = write_jsonl(tmp_path / "two" / "deeper" / "data" / "a.jsonl.zst", texts(200), compress=True)
    corpus_one = Corpus(find_documents(one.parent.parent), 0.1)
    corpus_two = Corpus(find_documents(two.parent.parent), 0.1)
    train, val = split(corpus_one)
    # The rule, computed independently: a hash of "relative path#index" below the fraction.
    expected_val = [f"a.jsonl.zst#{i}" for i in range(200) if unit_hash(f"a.jsonl.zst#{i}") < 0.1]
    assert [d.name for d in val] == expected_val
    assert [d.name for d in train] == [
        f"a.jsonl.zst#{i}" for i in range(200) if f"a.jsonl.zst#{i}" not in expected_val
    ]
    assert 8 <= len(val) <= 35
    # Another root (another machine) gives the same split; and the texts are the records..
    assert [(d.name, d.text) for d in split(corpus_two)[1]] == [(d.name, d.text) for d in val]
    assert {d.text for d in val} == {texts(200)[int(d.name.rsplit("#", 1)[1])] for d in val}
    # Pinned: a salted hash() (or any per-process choice) would give others.
    assert [d.name.rsplit("#", 1)[1] for d in val][:5] == ["4", "6", "7", "16", "28"]


def test_mixed_folder_is_one_stream(tmp_path):
    folder = tmp_path / "mixed"
    write_jsonl(folder / "a.jsonl", texts(30, "json"))
    pq.write_table(pa.table({"text": texts(30, "parquet")}), folder / "b.parquet")
    (folder / "c.txt").write_text("a plain text file\n")
    corpus = Corpus(find_documents(folder), 0.2)
    train, val = split(corpus)
    names = [d.name for d in train + val]
    assert len(names) == 61 == len(set(names))
    assert all(held_out(d.name, 0.2) for d in val) and not any(held_out(d.name, 0.2) for d in train)
    order = [d.name for _, d in corpus.documents()]
    assert order[0] == "a.jsonl#0" and order[30] == "b.parquet#0" and order[-1] == "c.txt"
    assert corpus.size() == sum(p.stat().st_size for p in folder.iterdir())


def test_dataset_dict_uses_its_own_splits(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": texts(20, "train")})
    validation = datasets.Dataset.from_dict({"text": texts(5, "validation")})
    test = datasets.Dataset.from_dict({"text": texts(4, "test")})
    datasets.DatasetDict({"train": train, "validation": validation, "test": test}).save_to_disk(
        str(tmp_path / "tvt")
    )
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "tt"))
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "t"))
    datasets.DatasetDict({"validation": validation}).save_to_disk(str(tmp_path / "v"))

    tr, va = split(Corpus([tmp_path / "tvt"], 0.5))
    assert [d.text for d in tr] == texts(20, "train") and [d.text for d in va] == texts(5, "validation")
    assert va[0].name == "tvt/validation#0" and va[0].split == "validation"
    tr, va = split(Corpus([tmp_path / "tt"], 0.5))
    assert [d.text for d in va] == texts(4, "test")
    # No held-out split of its own: its training records go by the hash rule.
    tr, va = split(Corpus([tmp_path / "t"], 0.3))
    assert [d.name for d in va] == [f"t/train#{i}" for i in range(20) if held_out(f"t/train#{i}", 0.3)]
    with pytest.raises(DataError, match=r"v has no 'train' split \(its splits: validation\)"):
        Corpus([tmp_path / "v"], 0.1)


def test_val_path_is_the_validation_set(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", texts(10))
    held = write_jsonl(tmp_path / "held.jsonl", texts(3, "held"))
    train, val = split(Corpus(find_documents(tmp_path), 0.5, [held]))
    assert [d.text for d in val] == texts(3, "held") and [d.text for d in train] == texts(10)


def test_a_split_side_left_empty_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", texts(3))
    corpus = Corpus([path], 0.001)
    train, val = split(corpus)
    assert not val
    with pytest.raises(
        DataError,
        match=r"no document fell into the validation split \(of 3 documents, val_fraction 0.001\); raise val_fraction",
    ):
        corpus.check_split(len(train), len(val))


def test_identity_follows_content_and_settings_not_location(tmp_path):
    a = write_jsonl(tmp_path / "a" / "c.jsonl", texts(10))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    identity = Corpus([a], 0.1).identity()
    assert Corpus([tmp_path / "b" / "c.jsonl"], 0.1).identity() == identity
    assert Corpus([a], 0.2).identity() != identity
    assert Corpus([a], 0.1, text_field="n").identity() != identity
    data = bytearray(a.read_bytes())
    data[12] ^= 1
    (tmp_path / "b" / "c.jsonl").write_bytes(bytes(data))
    assert Corpus([tmp_path / "b" / "c.jsonl"], 0.1).identity() != identity


def test_bpe_sample_is_the_smallest_hashes_that_fit(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", texts(3000))
    corpus = Corpus([path], 0.1)
    budget = 20_000
    sample = corpus.sample(budget)
    # Independently: the training documents sorted by the sample hash, taken while they fit.
    train, _ = split(corpus)
    expected, total = [], 0
    for document in sorted(train, key=lambda d: unit_hash(_SAMPLE_SALT + d.name)):
        if total + len(document.text.encode()) > budget:
            break
        expected.append(document)
        total += len(document.text.encode())
    expected.sort(key=lambda d: int(d.name.rsplit("#", 1)[1]))
    assert sample == [d.text for d in expected]
    assert budget - 100 < sum(len(t.encode()) for t in sample) <= budget
    # Uniform over the corpus, not a prefix of it; and never a validation document.
    indices = [int(d.name.rsplit("#", 1)[1]) for d in expected]
    assert min(indices) < 300 and max(indices) > 2700
    assert not {d.text for d in split(corpus)[1]} & set(sample)
    # Everything, when it fits.
    assert corpus.sample(10**9) == [d.text for d in train]


def test_bpe_sample_reads_only_what_it_may_keep(tmp_path, monkeypatch):
    import nexttoken.data.documents as documents

    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(200):
        (folder / f"f{i:03d}.txt").write_text(texts(200)[i] * 5)
    corpus = Corpus(find_documents(folder), 0.1)
    opened = []
    read = documents.read_document
    monkeypatch.setattr(
        documents, "read_document", lambda path, **kw: opened.append(path) or read(path, **kw)
    )
    read_bytes = []
    sample = corpus.sample(2_000, on_read=read_bytes.append)
    # Text files above the falling threshold are never opened.
    assert len(sample) < 20 and len(opened) < 100
    assert sum(read_bytes) == corpus.size()  # yet the progress bar reaches its end


def test_one_text_file_samples_its_head(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("é" * 5000 + "\n")
    (sample,) = Corpus([path], 0.1).sample(1001)
    assert sample == "é" * 500  # 1000 bytes: the cut never splits a character


def test_one_text_file_is_read_in_parts_and_split_at_split_texts_byte(tmp_path, monkeypatch):
    import nexttoken.data.documents as documents

    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}: caf\u00e9 \u65e5\u672c {'x' * (i % 50)}\n" for i in range(400)))
    whole = Document("book.txt", path.read_text())
    train, val = split_text(whole, 0.1)
    monkeypatch.setattr(documents, "READ_BYTES", 64)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail("read the whole file"))
    corpus = Corpus([path], 0.1)
    read: list[int] = []
    parts = list(corpus.documents(on_read=read.append, parts=True))
    assert len(parts) > path.stat().st_size // 100 and max(len(d.text) for _, d in parts) <= 64
    assert sum(read) == path.stat().st_size and max(read) <= 64
    for is_val, half in ((False, train), (True, val)):
        mine = [d for v, d in parts if v == is_val]
        assert "".join(d.text for d in mine) == half.text and {d.name for d in mine} == {half.name}
        assert [(d.part, d.more) for d in mine] == [(i, i < len(mine) - 1) for i in range(len(mine))]
    assert list(corpus.documents()) == [(False, train), (True, val)]
    (sample,) = corpus.sample(1001)
    assert sample == train.text.encode()[:1001].decode("utf-8", errors="ignore")


def test_records_are_split_by_the_documents_rule(tmp_path):
    # Conversations are read as records with several fields; they go to the split their name gives,
    # exactly as the same records read as documents do.
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", texts(120))
    pq.write_table(pa.table({"text": texts(40, "parquet"), "extra": list(range(40))}), folder / "b.parquet")
    corpus = Corpus(find_documents(folder), 0.2)
    by_documents = [is_val for is_val, _ in corpus.documents()]
    by_records = [(is_val, r.values) for is_val, r in corpus.records(["text"], optional=["extra", "missing"])]
    assert [is_val for is_val, _ in by_records] == by_documents and 10 < sum(by_documents) < 60
    assert by_records[0][1] == {"text": texts(120)[0], "extra": None, "missing": None}
    assert by_records[-1][1] == {"text": texts(40, "parquet")[-1], "extra": 39, "missing": None}
