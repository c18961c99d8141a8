"""``nexttoken eval MODEL EVAL --train-data TRAIN``: the score split into the tokens of text that occurs
in training and the clean rest, checked against per-token nats computed by hand with the model and an
overlap mask computed by hand; the words placed on their characters; the document start line."""

import json
import random
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_hf_model
from nexttoken.cli import main
from nexttoken.data.documents import Document
from nexttoken.data.overlap import (
    EvalNgrams,
    covered_character_spans,
    word_character_spans,
    words,
)
from nexttoken.data.tokenizers import bytes_tokenizer, describe_scored_start, load_local_tokenizer
from nexttoken.models.load import load_model
from nexttoken.scoring.text import evaluate_texts

N = 5
VOCABULARY = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "vo") for b in ("n", "r", "s", "x")]


def sentence(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(count))


@pytest.fixture(scope="module")
def corpus():
    """Training text, and evaluation documents: one with a stretch copied from training (re-cased,
    re-punctuated), one with a stretch copied with its middle word changed, one clean."""
    rng = random.Random(7)
    train = sentence(rng, 400)
    copied = train.split()[100:112]
    near = train.split()[200:209]
    near[4] = "zzz"
    documents = [
        f"{sentence(rng, 6)}. {' '.join(copied).upper().replace(' ', ', ', 3)}; {sentence(rng, 5)}\n",
        f"{sentence(rng, 4)} {' '.join(near)} {sentence(rng, 4)}",
        "Unrelated words: " + " ".join(f"w{k}" for k in range(15)),
    ]
    return train, documents


@pytest.fixture(scope="module")
def long_gpt2(tmp_path_factory):
    """A tiny GPT-2 whose context (512) holds each evaluation document whole: one window each."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("gpt2-512"), "gpt2", add_bos=False, max_positions=512)


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """A tiny Llama (its tokenizer puts ``<s>`` before every text) with a context of 512."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("llama-512"), "llama", add_bos=True, max_positions=512)


# --------------------------------------------------------------------------- by hand
def covered_words_by_hand(train: str, text: str, n: int) -> list[bool]:
    """Words of ``text`` (ASCII) covered by an n-gram of ``train``, exactly or with its middle word changed."""
    grams = set()
    train_words = [w.lower() for w in re.findall(r"[A-Za-z0-9]+", train)]
    for i in range(len(train_words) - n + 1):
        gram = train_words[i : i + n]
        grams.add(tuple(gram))
        grams.add(tuple(gram[: n // 2] + ["*"] + gram[n // 2 + 1 :]))
    found = [w.lower() for w in re.findall(r"[A-Za-z0-9]+", text)]
    covered = [False] * len(found)
    for i in range(len(found) - n + 1):
        gram = found[i : i + n]
        if tuple(gram) in grams or tuple(gram[: n // 2] + ["*"] + gram[n // 2 + 1 :]) in grams:
            covered[i : i + n] = [True] * n
    return covered


def token_mask_by_hand(text: str, covered: list[bool], offsets) -> list[bool]:
    """A token overlaps when one of its characters lies from a covered run's first word to its last."""
    places = [m.span() for m in re.finditer(r"[A-Za-z0-9]+", text)]
    marked = [False] * len(text)
    i = 0
    while i < len(covered):
        if covered[i]:
            j = i
            while j + 1 < len(covered) and covered[j + 1]:
                j += 1
            for c in range(places[i][0], places[j][1]):
                marked[c] = True
            i = j + 1
        else:
            i += 1
    return [any(marked[s:e]) for s, e in offsets]


def nats_by_hand(folder, text: str, bos: bool) -> tuple[torch.Tensor, list]:
    """Each token's nats from one forward pass of the transformers model (None for an unscored first token)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = ([tokenizer.bos_token_id] if bos else []) + encoding["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nats = -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    if not bos:  # the first token is not scored
        nats = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), nats])
    return nats, encoding["offset_mapping"]


# --------------------------------------------------------------------------- the split
@pytest.mark.parametrize("which", ["long_gpt2", "long_llama"])
def test_the_split_matches_nats_and_an_overlap_mask_computed_by_hand(which, corpus, request):
    folder = request.getfixturevalue(which)
    train, texts = corpus
    model, tokenizer = load_model(str(folder))
    evaluation = EvalNgrams([Document(f"d{i}", t) for i, t in enumerate(texts)], N)
    overlap = evaluation.result([evaluation.scan([Document("train", train)])])
    spans = [covered_character_spans(t, d.covered) for t, d in zip(texts, overlap.documents)]
    context = 512
    result = evaluate_texts(model, tokenizer, texts, context, context, overlap_spans=spans)
    bos = which == "long_llama"
    expected = {"overlapping": [0.0, 0, 0], "clean": [0.0, 0, 0]}
    for d, text in enumerate(texts):
        covered = covered_words_by_hand(train, text, N)
        assert list(overlap.documents[d].covered) == covered
        nats, offsets = nats_by_hand(folder, text, bos)
        assert len(nats) <= context, "one window per document: the forward pass above is the window"
        mask = token_mask_by_hand(text, covered, offsets)
        token_bytes = [len(text[s:e].encode()) for s, e in offsets]
        assert sum(token_bytes) == len(text.encode())  # ASCII, offsets that tile the text
        part = result.split.documents[d]
        for name, got, keep in (("overlapping", part[0], True), ("clean", part[1], False)):
            chosen = [k for k in range(len(mask)) if mask[k] == keep]
            scored = [k for k in chosen if not torch.isnan(nats[k])]
            assert got.tokens == len(scored)
            assert got.nll_sum == pytest.approx(float(nats[scored].sum()), rel=1e-5, abs=1e-6)
            assert got.bytes == sum(token_bytes[k] for k in chosen)
            expected[name][0] += float(nats[scored].sum())
            expected[name][1] += len(scored)
            expected[name][2] += sum(token_bytes[k] for k in chosen)
    assert result.split.documents[0][0].tokens > 5 and result.split.documents[1][0].tokens > 5
    assert result.split.documents[2][0].tokens == 0
    for name in ("overlapping", "clean"):
        part = getattr(result.split, name)
        assert part.nll_sum == pytest.approx(expected[name][0], rel=1e-5)
        assert (part.tokens, part.bytes) == tuple(expected[name][1:])
    # The two parts are the whole: exactly, sums and all.
    whole = result.split.overlapping, result.split.clean
    assert whole[0].nll_sum + whole[1].nll_sum == result.nll_sum
    assert whole[0].tokens + whole[1].tokens == result.tokens
    assert whole[0].bytes + whole[1].bytes == result.bytes == sum(len(t.encode()) for t in texts)


def test_windows_split_as_the_per_token_view_does(tiny_gpt2_dir, corpus):
    """Documents longer than the context: each read is put in the part of the token it scores."""
    from nexttoken.data.overlap import overlapping_tokens
    from nexttoken.scoring.text import score_text

    train, texts = corpus
    model, tokenizer = load_model(str(tiny_gpt2_dir))
    evaluation = EvalNgrams([Document(f"d{i}", t) for i, t in enumerate(texts)], N)
    overlap = evaluation.result([evaluation.scan([Document("train", train)])])
    spans = [covered_character_spans(t, d.covered) for t, d in zip(texts, overlap.documents)]
    result = evaluate_texts(model, tokenizer, texts, 16, 4, overlap_spans=spans)
    plain = evaluate_texts(model, tokenizer, texts, 16, 4)
    assert result.tokens == plain.tokens and result.nll_sum == pytest.approx(plain.nll_sum, rel=1e-12)
    for d, text in enumerate(texts):
        scores = score_text(model, tokenizer, text, 16, 4)
        mask = torch.from_numpy(overlapping_tokens(scores.offsets, spans[d]))
        scored = ~torch.isnan(scores.nll)
        overlapping, clean = result.split.documents[d]
        inside, outside = mask & scored, ~mask & scored
        assert (overlapping.tokens, clean.tokens) == (int(inside.sum()), int(outside.sum()))
        assert overlapping.nll_sum == pytest.approx(float(scores.nll[inside].sum()), rel=1e-9, abs=1e-9)
        assert clean.nll_sum == pytest.approx(float(scores.nll[outside].sum()), rel=1e-9)


# --------------------------------------------------------------------------- words on characters
def test_words_are_placed_on_the_characters_they_come_from():
    text = "“Don’t” — he said,\n  WELL-known\tﬁne\u00adly Café ½!"
    spans = word_character_spans(text)
    assert [text[s:e] for s, e in spans] == [
        "Don", "t", "he", "said", "WELL", "known", "ﬁne\u00adly", "Café", "½", "½",
    ]  # fmt: skip
    assert word_character_spans("a\u00a8b") is None  # NFKC makes a combining mark of a symbol: not placed
    rng = random.Random(1)
    alphabet = "abcXYZ019 \n\t.,;'\"-–—“”‘’«»éÉßﬁ\u00ad\u200b\u00a0ΣσΑ日本!?$€+=_()"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        spans = word_character_spans(text)
        if spans is None:
            continue
        found = words(text)
        assert len(spans) == len(found)
        for word, (s, e) in zip(found, spans):  # each word comes from its characters
            assert word in words(text[s:e]), (text, word, text[s:e])


# --------------------------------------------------------------------------- the command
def test_eval_train_data_json_and_table(tiny_gpt2_dir, corpus, tmp_path, capfd):
    train, texts = corpus
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": train}) + "\n")
    (tmp_path / "eval").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "eval" / f"d{i}.txt").write_text(text)
    args = ["eval", str(tiny_gpt2_dir), str(tmp_path / "eval"), "--train-data", str(tmp_path / "train.jsonl")]
    assert main([*args, "--overlap-n", str(N), "--json", "--no-progress"]) == 0
    out, err = capfd.readouterr()
    report = json.loads(out)
    overlap = report["overlap"]
    assert [d["class"] for d in overlap["documents"]] == ["copied", "partial", "clean"]
    # The near copy: the one 5-gram whose middle word is the changed one covers 5 words.
    assert overlap["documents"][1]["overlap_words"] == 0 and overlap["documents"][1]["partial_words"] >= 5
    for key in ("nll_sum", "tokens", "bytes"):
        assert overlap["overlapping"][key] + overlap["clean"][key] == report[key]
        assert sum(d["overlapping"][key] + d["clean"][key] for d in overlap["documents"]) == pytest.approx(
            report[key], rel=1e-12
        )
    assert overlap["clean"]["perplexity"] == pytest.approx(
        float(np.exp(overlap["clean"]["nll_sum"] / overlap["clean"]["tokens"]))
    )
    assert report["document_start"].startswith("document start: nothing (the tokenizer adds no BOS")
    assert "--bos yes prepends one" in err
    assert main([*args, "--overlap-n", str(N), "--no-progress"]) == 0
    table = capfd.readouterr().out
    assert re.search(r"^overlapping +\d+ tokens \(\d+ bytes\): perplexity", table, re.M)
    assert re.search(r"^train overlap +5-grams: .*documents: 1 copied, 1 partial, 1 clean$", table, re.M)


def test_eval_train_data_errors(tiny_gpt2_dir, tmp_path, capfd):
    (tmp_path / "eval.txt").write_text("some words to score " * 5)
    args = ["eval", str(tiny_gpt2_dir), str(tmp_path / "eval.txt"), "--no-progress"]
    assert main([*args, "--train-data", str(tmp_path / "missing")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --train-data: path not found: {tmp_path / 'missing'}")
    assert main([*args, "--train-data", str(tmp_path / "eval.txt"), "--overlap-n", "0"]) == 2
    assert "error: --overlap-n must be a whole number of words" in capfd.readouterr().err


# --------------------------------------------------------------------------- what starts a document
def test_the_document_start_line_says_which_token_and_why(tiny_gpt2_dir, tiny_llama_dir):
    own = bytes_tokenizer()
    assert describe_scored_start(own, own.eos_id) == (
        "document start: <|endoftext|> (nexttoken's tokenizer: the EOS that ends each training document "
        "starts the next)"
    )
    llama = load_local_tokenizer(tiny_llama_dir)
    assert describe_scored_start(llama, llama.bos_id).startswith(
        "document start: <s> (the tokenizer's BOS: it puts it before every text it encodes"
    )
    gpt2 = load_local_tokenizer(tiny_gpt2_dir)
    assert "which it does not add itself" in describe_scored_start(gpt2, gpt2.bos_id, "yes")
    assert describe_scored_start(gpt2, None, "no").startswith("document start: nothing (\x1fbos\x1f no")


def test_eval_warns_when_a_model_trained_with_a_start_is_scored_without(tiny_llama_dir, tmp_path, capfd):
    (tmp_path / "eval.txt").write_text("some words to score " * 5)
    args = ["eval", str(tiny_llama_dir), str(tmp_path / "eval.txt"), "--no-progress", "--json"]
    assert main([*args, "--bos", "no"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["document_start"].startswith("document start: nothing (--bos no")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: this model's tokenizer puts <s> before every"
    )
    assert "--bos no scores without it" in warnings[0]
    assert main(args) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["document_start"].startswith("document start: <s> (the tokenizer's BOS")
    assert "warning:" not in err
