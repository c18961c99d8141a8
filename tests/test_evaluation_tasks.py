"""lm-evaluation-harness tasks through ``NextTokenLM``: checked against ``nexttoken eval``'s own
scores, against lm-eval's ``HFLM`` on the same local model folders, and through the CLI.

Every task here is created in a temporary folder from generated text (HellaSwag's format for the
multiple-choice task); nothing touches the network: ``HFLM`` is built from local folders or from a
model object, inside :func:`nexttoken.scoring.lmeval.offline.offline`.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from conftest import TINY_TEXT  # noqa: E402
from nexttoken.cli import main  # noqa: E402
from nexttoken.data.tokenizers import bytes_tokenizer  # noqa: E402
from nexttoken.models.gpt import GPT, GPTConfig  # noqa: E402
from nexttoken.models.hf import (
    chat_tokenizer_of,  # noqa: E402
    load_hf_causal_lm,  # noqa: E402
)
from nexttoken.models.masking import branch_positions  # noqa: E402
from nexttoken.scoring.lmeval import tasks  # noqa: E402
from nexttoken.scoring.lmeval.adapter import NextTokenLM  # noqa: E402
from nexttoken.scoring.lmeval.offline import offline  # noqa: E402
from nexttoken.scoring.lmeval.requests import Request, plan_rows  # noqa: E402
from nexttoken.scoring.text import evaluate_texts  # noqa: E402

WORDS = (
    "the a of to and in is was for on with as by at from it that this be are or which "
    "king queen castle river stone light night day sword crown bread ship storm"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tasks(folder: Path, n_items: int = 24, n_docs: int = 5) -> Path:
    """Three local tasks: ``tinyswag`` (multiple choice in HellaSwag's format: activity_label, ctx_a,
    ctx_b, four endings, label), ``tinytext`` (rolling perplexity) and ``tinyecho`` (generation)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tinyswag.jsonl", "w") as f:
        for i in range(n_items):
            item = {
                "ind": i,
                "activity_label": sentence(rng, 2).title(),
                "ctx_a": sentence(rng, 8).capitalize() + ".",
                "ctx_b": sentence(rng, 3),
                "endings": [sentence(rng, rng.randint(3, 9)) + "." for _ in range(4)],
                "label": str(rng.randrange(4)),
            }
            f.write(json.dumps(item) + "\n")
    with open(folder / "tinytext.jsonl", "w") as f:
        for _ in range(n_docs):
            text = " ".join(sentence(rng, 12).capitalize() + "." for _ in range(rng.randint(2, 25)))
            f.write(json.dumps({"text": text}) + "\n")
    with open(folder / "tinyecho.jsonl", "w") as f:
        for _ in range(4):
            f.write(json.dumps({"question": sentence(rng, 5), "answer": sentence(rng, 2)}) + "\n")
    metadata = "metadata:\n  version: 1.0\n"
    (folder / "tinyswag.yaml").write_text(
        "task: tinyswag\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {folder / 'tinyswag.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{activity_label}}: {{ctx_a}} {{ctx_b|capitalize}}"\n'
        'doc_to_target: "{{label|int}}"\ndoc_to_choice: "{{endings}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n" + metadata
    )
    (folder / "tinytext.yaml").write_text(
        "task: tinytext\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tinytext.jsonl'}\n"
        'output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        + metadata
    )
    (folder / "tinyecho.yaml").write_text(
        "task: tinyecho\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tinyecho.jsonl'}\n"
        'output_type: generate_until\ntest_split: test\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        + metadata
    )
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    """A tiny Llama whose tokenizer puts ``<s>`` before every text (the document start)."""
    return load_hf_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    """A tiny GPT-2 whose tokenizer starts documents with no token."""
    return load_hf_causal_lm(tiny_gpt2_dir)


def hflm(folder: Path, **kwargs):
    """lm-eval's own HF model class on a local folder, offline."""
    from lm_eval.models.huggingface import HFLM

    with offline():
        return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=8, **kwargs)


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def multiple_choice_requests(rng: random.Random, n_questions: int) -> list[tuple[str, str]]:
    requests = []
    for _ in range(n_questions):
        context = sentence(rng, rng.randint(4, 12)).capitalize() + ":"
        requests += [(context, " " + sentence(rng, rng.randint(1, 6))) for _ in range(4)]
    return requests


# --------------------------------------------------------------------------- rolling == nexttoken eval
@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "context, stride, bos",
    [(32, 32, "auto"), (32, 8, "auto"), (64, 20, "auto"), (32, 8, "yes"), (32, 8, "no")],
)
def test_rolling_equals_eval_nll_sum(which, context, stride, bos, request):
    model, tokenizer = request.getfixturevalue(which)
    rng = random.Random(1)
    docs = [TINY_TEXT, "Pack my box.", sentence(rng, 90), "a"]
    lm = NextTokenLM(
        model=model, tokenizer=tokenizer, context=context, stride=stride, bos=bos, progress=False
    )
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    for doc, ll in zip(docs, got):
        if len(tokenizer.encode(doc)) == 1 and lm.start is None:
            assert ll == 0.0  # one token and no document start: nothing to score (eval says so)
            continue
        want = evaluate_texts(model, tokenizer, [doc], context, stride, bos=bos).nll_sum
        assert -ll == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_rolling_default_windows_are_lm_evals_disjoint_windows(llama):
    model, tokenizer = llama
    lm = NextTokenLM(model=model, tokenizer=tokenizer, progress=False)
    assert lm.context == model.max_context == 64 and lm.stride == 64


# --------------------------------------------------------------------------- parity with HFLM (fast)
def test_loglikelihood_matches_hflm_request_by_request(llama, tiny_llama_dir):
    """A tokenizer that adds ``<s>``: contexts start with it for both; shared contexts, one-token
    continuations, duplicates, prefixes of other requests, empty and over-long contexts."""
    model, tokenizer = llama
    rng = random.Random(2)
    requests = multiple_choice_requests(rng, 6)
    requests += [("The quick brown", " fox"), ("The quick brown", " fox"), ("The quick brown", " fox jumps")]
    requests += [("Sphinx of", " b"), ("Sphinx of", " q"), ("", "Pack my box"), ("", " with five")]
    requests += [(sentence(rng, 60), " the castle")]  # longer than the 64-token context: cut on the left
    reqs = instances("loglikelihood", requests)
    reference = hflm(tiny_llama_dir).loglikelihood(reqs)
    for share in (True, False):
        lm = NextTokenLM(model=model, tokenizer=tokenizer, share_context=share, batch_size=3, progress=False)
        assert lm.share_context is share  # a Llama honours the packed rows' 4-D mask
        got = lm.loglikelihood(reqs)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, reference):
            assert ll == pytest.approx(ref_ll, abs=1e-4)
            assert greedy == ref_greedy
        assert lm.truncated == 1


@pytest.mark.parametrize("bos", ["lm-eval", "auto"])
def test_loglikelihood_matches_hflm_without_a_start_token(bos, gpt2, tiny_gpt2_dir):
    """A tokenizer that starts documents with no token: contexts are the bare text for both. An
    empty context is the BOS under lm-eval's convention (the default), as HFLM's; under nexttoken's
    rule it is the EOS, so HFLM is given the EOS as its prefix then."""
    model, tokenizer = gpt2
    assert tokenizer.bos_id is not None and tokenizer.bos_id != tokenizer.eos_id
    requests = multiple_choice_requests(random.Random(3), 5) + [("", "The quick brown fox")]
    reqs = instances("loglikelihood", requests)
    prefix = {} if bos == "lm-eval" else {"prefix_token_id": tokenizer.eos_id}
    reference = hflm(tiny_gpt2_dir, **prefix).loglikelihood(reqs)
    got = NextTokenLM(model=model, tokenizer=tokenizer, bos=bos, progress=False).loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in reference]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in reference], abs=1e-4)


def test_rolling_follows_hflm_by_default_and_nexttokens_rule_on_request(llama, tiny_llama_dir):
    """HFLM puts its prefix token before the tokenizer's own ``<s>``, and so does the default (lm-eval's
    convention); nexttoken's rule (``bos="auto"``) starts with one ``<s>``, which is HFLM without the
    tokenizer's own (``add_bos_token=False``): one token fewer scored per document."""
    model, tokenizer = llama
    docs = [(TINY_TEXT,), (sentence(random.Random(4), 80),)]
    reqs = instances("loglikelihood_rolling", docs)
    default = NextTokenLM(model=model, tokenizer=tokenizer, progress=False)
    assert default.settings()["rolling_prefix"] == "<s><s>"
    doubled = hflm(tiny_llama_dir).loglikelihood_rolling(reqs)  # <s> <s> text
    assert default.loglikelihood_rolling(reqs) == pytest.approx(doubled, abs=1e-4)
    ours = NextTokenLM(model=model, tokenizer=tokenizer, bos="auto", progress=False).loglikelihood_rolling(
        reqs
    )
    like = hflm(tiny_llama_dir, add_bos_token=False).loglikelihood_rolling(reqs)
    assert ours == pytest.approx(like, abs=1e-4)
    assert all(d < o - 1e-3 for d, o in zip(doubled, ours))


# --------------------------------------------------------------------------- the row plan
def test_row_plan_reuses_prefixes_and_shares_contexts():
    ctx = (5, 6, 7)
    reqs = [
        Request(0, ctx, 3, (8,)),  # one-token continuation: its input is the context itself
        Request(1, ctx + (8,), 3, (8, 9)),
        Request(2, ctx + (8,), 3, (8, 9)),  # identical to 1
        Request(3, ctx + (10, 11), 3, (10, 11, 12)),
        Request(4, (1, 2), 1, (3,)),
    ]
    separate = plan_rows(reqs, share_context=False, max_length=64)
    assert sorted(len(r.ids) for r in separate) == [2, 4, 5]  # 0 and 2 read from 1's row
    assert all(r.segments is None for r in separate)
    shared = plan_rows(reqs, share_context=True, max_length=64)
    assert sorted(r.ids.tolist() for r in shared) == [[1, 2], [5, 6, 7, 8, 10, 11]]
    packed = next(r for r in shared if len(r.ids) == 6)
    assert packed.segments.tolist() == [0, 0, 0, 1, 2, 2]
    assert branch_positions(packed.segments[None])[0].tolist() == [0, 1, 2, 3, 3, 4]
    reads: dict[int, list[int]] = {}
    for column, target, owner in zip(
        packed.columns.tolist(), packed.targets.tolist(), packed.owners.tolist()
    ):
        reads.setdefault(owner, []).append(column)
        assert target == reqs[owner].targets[len(reads[owner]) - 1]
    assert reads == {0: [2], 1: [2, 3], 2: [2, 3], 3: [2, 4, 5]}
    assert len(plan_rows(reqs, share_context=True, max_length=5)) == 3  # the context row splits


@pytest.mark.parametrize("share", [True, False])
def test_builtin_gpt_packs_contexts_and_scores_as_by_hand(share):
    torch.manual_seed(0)
    tokenizer = bytes_tokenizer()
    model = GPT(
        GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    ).eval()
    lm = NextTokenLM(model=model, tokenizer=tokenizer, batch_size=2, share_context=share, progress=False)
    assert lm.share_context is share  # the built-in GPT honours a packed row's shared context
    requests = [("Hello", " world"), ("Hello", " there"), ("", "abc")]
    got = lm.loglikelihood(instances("loglikelihood", requests))
    for (context, continuation), (ll, greedy) in zip(requests, got):
        ids = [tokenizer.eos_id] + tokenizer.encode(context + continuation)  # the EOS starts documents
        n = len(tokenizer.encode(continuation))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
        picked = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert ll == pytest.approx(float(picked[-n:].sum()), abs=1e-5)
        assert greedy == bool((logp.argmax(-1)[-n:] == torch.tensor(ids[-n:])).all())


# --------------------------------------------------------------------------- generation
def greedy_ids(hf_model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf_model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def counting_generate(model, calls: list[int]):
    generate = model.generate
    return lambda ids, n, **kw: calls.append(n) or generate(ids, n, **kw)


def test_generate_until_honours_until_and_max_gen_toks(gpt2, monkeypatch):
    model, tokenizer = gpt2
    lm = NextTokenLM(model=model, tokenizer=tokenizer, progress=False)
    prompt = "A bold claim"
    expected = greedy_ids(model.model, lm.tok_encode(prompt), 12)
    assert tokenizer.eos_id not in expected
    text = lm.tok_decode(expected)
    (five,) = lm.generate_until(instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 5})]))
    assert five == lm.tok_decode(expected[:5])
    stop = lm.tok_decode(expected[8:9])
    assert stop and stop in text and text.split(stop)[0]
    calls: list[int] = []
    monkeypatch.setattr(model, "generate", counting_generate(model, calls))
    (cut,) = lm.generate_until(instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 40})]))
    assert cut == text.split(stop)[0]
    assert sum(calls) < 40  # it stopped after the stop string, not at max_gen_toks


def test_generate_until_stops_at_the_eos(llama, monkeypatch):
    model, tokenizer = llama
    lm = NextTokenLM(model=model, tokenizer=tokenizer, progress=False)
    prompt = "The quick brown fox"
    expected = greedy_ids(model.model, lm.tok_encode(prompt), 12)
    assert tokenizer.eos_id in expected[1:]  # this prompt's greedy path ends its document early
    calls: list[int] = []
    monkeypatch.setattr(model, "generate", counting_generate(model, calls))
    (out,) = lm.generate_until(instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 40})]))
    assert out == lm.tok_decode(expected[: expected.index(tokenizer.eos_id)])
    assert sum(calls) < 40


# --------------------------------------------------------------------------- the command line
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_runs_local_tasks_on_an_hf_folder(tiny_llama_dir, task_dir, capsys):
    code, out, err = run_cli(
        capsys,
        tiny_llama_dir,
        "--tasks",
        "tinyswag,tinytext,tinyecho",
        "--include-path",
        task_dir,
        "--json",
        "--no-progress",
    )
    assert code == 0, err
    results = json.loads(out)
    assert set(results["results"]) == {"tinyswag", "tinytext", "tinyecho"}
    assert 0 <= results["results"]["tinyswag"]["acc,none"] <= 1
    assert results["results"]["tinytext"]["word_perplexity,none"] > 1
    assert results["nexttoken"] == {
        "model": str(tiny_llama_dir),
        "context": 64,
        "stride": 64,
        "bos": "lm-eval",
        "start_token": "<s>",
        "rolling_prefix": "<s><s>",
        "dtype": "float32",
        "device": "cpu",
        "batch_size": "auto",
        "share_context": True,
        "chat_template": False,
    }
    assert results["config"]["nexttoken"]["context"] == 64


def test_cli_limit_and_table(tiny_gpt2_dir, task_dir, capsys):
    code, out, err = run_cli(
        capsys,
        tiny_gpt2_dir,
        "--tasks",
        "tinyswag",
        "--include-path",
        task_dir,
        "--limit",
        "5",
        "--no-progress",
    )
    assert code == 0, err
    assert "|tinyswag" in out and "acc_norm" in out
    assert "document start: '<s>' (lm-eval's convention, as its HFLM; --bos auto for nexttoken's rule)" in err


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["DATA.txt", "--tasks", "tinyswag"], ["--tasks runs lm-eval tasks on their own data"]),
        (["--tasks", ","], ["--tasks: name at least one task"]),
        (
            ["--tasks", "tinyswag", "--include-path", "no/such/dir"],
            ["--include-path no/such/dir: no such folder"],
        ),
        (["DATA.txt", "--limit", "3"], ["--limit only applies with --tasks"]),
        (["--tasks", "tinyswag", "--limit", "2.5"], ["--limit must be a whole number"]),
        (["--tasks", "tinyswag", "--apply-chat-template"], ["has no chat template", "--apply-chat-template"]),
        (["--tasks", "hub_only"], ["task 'hub_only'", "not available offline", "provide its data locally"]),
        (["--tasks", "missing_file"], ["task 'missing_file'", "not available offline"]),
        ([], ["DATA: pass at least one text file"]),
    ],
)
def test_cli_bad_input_is_one_line(tiny_gpt2_dir, task_dir, tmp_path, capsys, extra, fragments):
    (tmp_path / "DATA.txt").write_text(TINY_TEXT)
    (task_dir / "hub_only.yaml").write_text(
        "task: hub_only\ndataset_path: nexttoken-tests/no-such-dataset\noutput_type: loglikelihood_rolling\n"
        'test_split: test\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    )
    (task_dir / "missing_file.yaml").write_text(
        "task: missing_file\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'nowhere.jsonl'}\n"
        'output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    )
    extra = [str(tmp_path / a) if a == "DATA.txt" else a for a in extra]
    if "--tasks" in extra and "--include-path" not in extra:
        extra += ["--include-path", str(task_dir)]
    code, _, err = run_cli(capsys, tiny_gpt2_dir, *extra, "--no-progress")
    assert_one_line_error(code, err, *fragments)


def test_cli_without_lm_eval_says_how_to_install(tiny_gpt2_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    for name in ("adapter", "tasks"):  # imported again, so that importing lm_eval fails
        monkeypatch.delitem(sys.modules, f"nexttoken.scoring.lmeval.{name}", raising=False)
        monkeypatch.delattr(sys.modules["nexttoken.scoring.lmeval"], name, raising=False)
    code, _, err = run_cli(capsys, tiny_gpt2_dir, "--tasks", "tinyswag")
    assert_one_line_error(code, err, 'pip install "nexttoken[tasks]"')


def test_chat_template_formats_prompts_with_special_tokens(tiny_llama_dir, tmp_path, llama):
    """A folder whose tokenizer has a chat template: prompts are rendered by it, and its special
    tokens become the special ids, not their characters."""
    from transformers import AutoTokenizer

    folder = tmp_path / "chat"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    fast = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    fast.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    fast.save_pretrained(folder)
    chat = chat_tokenizer_of(folder)
    assert chat is not None and chat_tokenizer_of(tiny_llama_dir) is None
    model, tokenizer = llama
    lm = NextTokenLM(model=model, tokenizer=tokenizer, chat_tokenizer=chat, progress=False)
    prompt = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<s>hi</s>"
    assert lm.tok_encode(prompt) == [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]


# --------------------------------------------------------------------------- slow: trained, exported, SmolLM2
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small GPT trained briefly with ``nexttoken fit`` (BPE, context 128), and its export."""
    from test_cli import write_corpus

    base = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(base / "corpus", n_docs=6, words_per_doc=400)
    args = ["fit", "--data.path", corpus, "--data.tokenizer", "bpe", "--data.vocab_size", "320"]
    args += ["--data.block_size", "128", "--data.batch_size", "4", "--data.val_fraction", "0.3"]
    args += ["--data.cache_dir", base / "cache", "--model.n_layer", "2", "--model.n_head", "2"]
    args += ["--model.n_embd", "32", "--model.warmup_steps", "2", "--trainer.max_steps", "30"]
    args += ["--trainer.val_check_interval", "10", "--trainer.default_root_dir", base / "runs"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]
    assert main([str(a) for a in args]) == 0
    ckpt = base / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), str(base / "exported")]) == 0
    return ckpt, base / "exported"


def evaluate(lm, task_dir: Path, names: list[str], **kwargs) -> dict:
    manager = tasks.task_manager(names, [task_dir])
    loaded = tasks.load_tasks(manager, names)
    return tasks.evaluate_tasks(lm, loaded, manager, log_samples=True, bootstrap_iters=0, **kwargs)


def assert_same_results(ours: dict, reference: dict) -> None:
    """Per-request log-likelihoods within 1e-4; acc/acc_norm identical; perplexities equal."""
    for name, samples in reference["samples"].items():
        mine = {s["doc_id"]: s for s in ours["samples"][name]}
        for sample in samples:
            got, want = mine[sample["doc_id"]]["resps"], sample["resps"]
            for g, w in zip(got, want):
                g, w = g[0], w[0]
                if isinstance(w, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert g[0] == pytest.approx(w[0], abs=1e-4) and g[1] == w[1]
                else:
                    assert g == pytest.approx(w, abs=1e-4)
    for name, metrics in reference["results"].items():
        for key, value in metrics.items():
            if key.startswith(("acc,", "acc_norm,")):
                assert ours["results"][name][key] == value, (name, key)
            elif key.startswith(("word_perplexity,", "byte_perplexity,", "bits_per_byte,")):
                assert ours["results"][name][key] == pytest.approx(value, rel=1e-6), (name, key)


@pytest.mark.slow
def test_checkpoint_and_its_export_match_hflm_on_the_export(trained, tmp_path):
    """The same trained model three ways: its checkpoint and its export through NextTokenLM, and
    the export through lm-eval's HFLM: by default as HFLM is; with nexttoken's rule (``bos="auto"``) as
    HFLM without the tokenizer's own start token on rolling documents."""
    ckpt, exported = trained
    task_dir = write_tasks(tmp_path / "tasks", n_items=30, n_docs=6)
    reference = hflm(exported)
    mc = evaluate(reference, task_dir, ["tinyswag"])
    rolling = evaluate(reference, task_dir, ["tinytext"])
    reference.add_bos_token = False
    rolling_single_start = evaluate(reference, task_dir, ["tinytext"])
    for path in (ckpt, exported):
        lm = NextTokenLM(str(path), progress=False)
        assert lm.share_context
        assert_same_results(evaluate(lm, task_dir, ["tinyswag"]), mc)
        assert_same_results(evaluate(lm, task_dir, ["tinytext"]), rolling)
        own_rule = NextTokenLM(str(path), bos="auto", progress=False)
        assert_same_results(evaluate(own_rule, task_dir, ["tinytext"]), rolling_single_start)


@pytest.mark.slow
def test_cli_on_a_run_checkpoint_writes_results_beside_the_run(trained, task_dir, capsys):
    ckpt, exported = trained
    code, out, err = run_cli(
        capsys, ckpt, "--tasks", "tinyswag,tinytext", "--include-path", task_dir, "--no-progress"
    )
    assert code == 0, err
    written = ckpt.parent.parent / "tasks" / "last--tinyswag+tinytext.json"
    results = json.loads(written.read_text())
    assert results["nexttoken"]["start_token"] == "<|endoftext|>" and results["nexttoken"]["stride"] == 128
    acc = results["results"]["tinyswag"]["acc,none"]
    assert f"{acc:.4f}" in out and "word_perplexity" in out
    code, out, _ = run_cli(
        capsys, exported, "--tasks", "tinyswag", "--include-path", task_dir, "--json", "--no-progress"
    )
    assert code == 0 and json.loads(out)["results"]["tinyswag"]["acc,none"] == acc


@pytest.mark.slow
def test_cli_unknown_task_suggests_close_names(tiny_gpt2_dir, task_dir, capsys):
    code, _, err = run_cli(capsys, tiny_gpt2_dir, "--tasks", "hellaswg", "--include-path", task_dir)
    assert_one_line_error(code, err, "unknown task 'hellaswg'", "did you mean: hellaswag")
    code, _, err = run_cli(capsys, tiny_gpt2_dir, "--tasks", "tinyswagg", "--include-path", task_dir)
    assert_one_line_error(code, err, "unknown task 'tinyswagg'", "tinyswag")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from transformers import AutoTokenizer

    model, tokenizer = load_hf_causal_lm(smollm2_gguf)
    fast = AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, local_files_only=True
    )
    return model, tokenizer, fast


@pytest.mark.slow
def test_smollm2_matches_hflm(smollm2, tmp_path):
    """SmolLM2 (its tokenizer starts documents with no token): multiple choice and rolling as HFLM by
    default (lm-eval's convention: the first token conditioned on the BOS), and with ``bos="yes"``;
    nexttoken's own rule (``bos="auto"``) leaves the first token unscored. HFLM gets the very same
    dequantized model object (no second load, no Hub)."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, fast = smollm2
    task_dir = write_tasks(tmp_path / "tasks", n_items=10, n_docs=2)
    with offline():
        reference = HFLM(pretrained=model.model, tokenizer=fast, batch_size=8, max_length=256)
    mc = evaluate(reference, task_dir, ["tinyswag"])
    rolling = evaluate(reference, task_dir, ["tinytext"])
    lm = NextTokenLM(model=model, tokenizer=tokenizer, context=256, batch_size=8, progress=False)
    assert lm.share_context and lm.start is None
    assert_same_results(evaluate(lm, task_dir, ["tinyswag"]), mc)
    assert_same_results(evaluate(lm, task_dir, ["tinytext"]), rolling)
    with_bos = NextTokenLM(model=model, tokenizer=tokenizer, context=256, bos="yes", progress=False)
    assert_same_results(evaluate(with_bos, task_dir, ["tinytext"]), rolling)
    own_rule = NextTokenLM(model=model, tokenizer=tokenizer, context=256, bos="auto", progress=False)
    auto = evaluate(own_rule, task_dir, ["tinytext"])["results"]["tinytext"]["word_perplexity,none"]
    assert math.isfinite(auto) and auto != rolling["results"]["tinytext"]["word_perplexity,none"]


@pytest.mark.slow
def test_cli_runs_tasks_on_a_gguf_file(smollm2_gguf, task_dir, capsys):
    code, out, err = run_cli(
        capsys, smollm2_gguf, "--tasks", "tinyswag,tinyecho", "--include-path", task_dir, "--context", "256",
        "--limit", "4", "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out)
    assert results["nexttoken"]["start_token"] is None and results["nexttoken"]["share_context"] is True
    assert results["n-samples"]["tinyswag"]["effective"] == 4
    assert 0 <= results["results"]["tinyecho"]["exact_match,none"] <= 1
