"""Preference tuning: pair records, rendering and masks, fitting, batches, the objectives, the exact
per-pair gradient under any accumulation, the frozen reference and the validation scoreboard."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nexttoken.data.chat import detect_format, resolve_chat_template
from nexttoken.data.formats import choose_data_format
from nexttoken.data.preferences import (
    PairSet,
    collate_pairs,
    encode_pair,
    fit_pairs_to_block,
    pair_train_plan,
    pair_val_plan,
    to_pair,
)
from nexttoken.data.tokenizers import build_tokenizer
from nexttoken.errors import DataError, UserError
from nexttoken.scoring.preferences import ReplyLogps, reply_logps
from nexttoken.training.module import CausalLMModule
from nexttoken.training.objectives import dpo, ipo, log1m_exp, orpo, simpo

VOCAB = 259  # the bytes tokenizer's
ROW = 256


def chatml():
    """The bytes tokenizer's ChatML template (also read by ddp_gradient_script.py)."""
    return resolve_chat_template(build_tokenizer("bytes"))


@pytest.fixture(scope="module")
def template():
    return chatml()


def records(n: int = 8) -> list[dict]:
    """``n`` unit-conversion pairs of different lengths: the right factor chosen, a wrong one rejected."""
    out = []
    for i in range(n):
        a = 3 + 7 * i
        out.append(
            {
                "prompt": f"{a} km in m?" + " please" * (i % 3),
                "chosen": f"{a * 1000} m",
                "rejected": f"{a * 100} m",
            }
        )
    return out


def encoded_pairs(template, n: int = 8):
    return [encode_pair(template, to_pair(r, f"record {i + 1}")) for i, r in enumerate(records(n))]


# --------------------------------------------------------------------------- records
def test_detection_and_the_three_shapes_give_the_same_pair(tmp_path):
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"})[0] == "preference"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(2)))
    assert choose_data_format([path], "auto") == (
        "preference",
        "format: preference (auto: the records have 'chosen' and 'rejected')",
    )
    flat = to_pair({"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}, "r1")
    user = [{"role": "user", "content": "Hi?"}]
    conversational = to_pair(
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        "r1",
    )
    whole = to_pair(
        {
            "chosen": [*user, {"role": "assistant", "content": "Yes."}],
            "rejected": [*user, {"role": "assistant", "content": "No."}],
        },
        "r1",
    )
    assert flat == conversational == whole
    assert [m.role for m in flat.prompt] == ["user"] and flat.chosen.content == "Yes."


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "chosen": "b"}, r"^pairs.jsonl, line 3 has no 'rejected'"),
        ({"prompt": "a", "rejected": "b"}, r"has no 'chosen'"),
        (
            {
                "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}],
            },
            r"line 3: 'chosen' and 'rejected' do not share every message but the last",
        ),
        ({"chosen": "a", "rejected": "b"}, r"has no 'prompt'"),
        (
            {"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"},
            r"'chosen' must be one assistant message",
        ),
    ],
)
def test_bad_records_name_their_line(record, message):
    with pytest.raises(DataError, match=message):
        to_pair(record, "pairs.jsonl, line 3")


# --------------------------------------------------------------------------- rendering and fitting
def test_each_reply_scores_its_own_text_and_end_of_turn_only(template):
    pair = to_pair({"prompt": "5 km in m?", "chosen": "5000 m", "rejected": "500 m"}, "r1")
    for example, reply in zip(encode_pair(template, pair), ("5000 m", "500 m")):
        scored = template.tokenizer.decode(example.tokens[example.scored].tolist())
        assert scored == reply + "<|im_end|>"
        assert example.tokens[0] != example.tokens[example.scored][0]  # the prompt is not scored


def test_long_prompts_are_cut_from_the_left_and_unfit_pairs_dropped(template):
    pairs = encoded_pairs(template, 3)
    chosen, rejected = pairs[0]
    block = len(chosen) - 6  # n tokens are n - 1 positions: 5 too many, so the first 5 tokens go
    kept, report = fit_pairs_to_block(pairs[:1], block)
    assert report.truncated == 1 and len(kept[0][0]) == block + 1
    np.testing.assert_array_equal(kept[0][0].tokens, chosen.tokens[5:])
    assert kept[0][0].n_scored == chosen.n_scored and kept[0][1].n_scored == rejected.n_scored

    identical = (chosen, chosen)
    kept, report = fit_pairs_to_block([identical, pairs[1]], 400)
    assert (report.identical, report.kept) == (1, 1)
    with pytest.raises(DataError, match="none of the 1 preference pairs.*identical"):
        fit_pairs_to_block([identical], 400)
    # A block shorter than the end-of-turn stretch leaves a reply with nothing scored: dropped, not NaN.
    with pytest.raises(DataError, match="no token within 1 tokens"):
        fit_pairs_to_block(pairs, 1)


def test_plans_put_every_pair_in_one_batch_on_one_rank():
    for world in (1, 2):
        val = [
            i for rank in range(world) for b in pair_val_plan(11, 3, rank=rank, world_size=world) for i in b
        ]
        assert sorted(val) == list(range(11))
        train = [
            b
            for rank in range(world)
            for b in pair_train_plan(11, 3, seed=1, epoch=0, rank=rank, world_size=world)
        ]
        flat = [i for b in train for i in b]
        assert len(flat) == len(set(flat)) and all(len(b) <= 3 for b in train)


# --------------------------------------------------------------------------- log-probabilities
def make_module(cls=CausalLMModule, **kwargs) -> CausalLMModule:
    torch.manual_seed(0)
    module = cls(model="tiny", vocab_size=VOCAB, block_size=ROW, n_layer=2, n_head=2, n_embd=16, **kwargs)
    module.configure_model()
    return module


def by_hand_logps(model, pairs) -> torch.Tensor:
    """(n, 2): each reply's summed log-probability from the model's own forward on the whole
    sequence alone, log_softmax in float64, summed over the reply's scored tokens."""
    out = []
    for pair in pairs:
        row = []
        for example in pair:
            tokens = torch.from_numpy(example.tokens)
            logits = model(tokens[None, :-1])[0].double()
            logp = logits.log_softmax(-1).gather(-1, tokens[1:, None])[:, 0]
            row.append(logp[torch.from_numpy(example.scored[1:])].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


def test_reply_logps_are_sums_over_the_reply_packed_or_not(template):
    pairs = encoded_pairs(template)
    module = make_module()
    expected = by_hand_logps(module.model.eval(), pairs)
    for width in (None, ROW):
        batch = collate_pairs(pairs, range(8), pad_id=0, packed_width=width)
        got = reply_logps(module.model, batch)
        torch.testing.assert_close(torch.stack([got.chosen, got.rejected], 1), expected, atol=1e-5, rtol=0)
        assert got.chosen_tokens.tolist() == [p[0].n_scored for p in pairs]
    packed = collate_pairs(pairs, range(8), pad_id=0, packed_width=ROW)
    assert packed.input_ids.size(0) < 16  # replies really share rows


# --------------------------------------------------------------------------- objectives
def test_objectives_match_their_papers_by_hand():
    pc, pr, rc, rr = -10.0, -14.0, -11.0, -12.0
    nc, nr = 4, 7
    pol = ReplyLogps(*(torch.tensor([v], dtype=torch.float64) for v in (pc, pr, nc, nr)))
    ref = ReplyLogps(*(torch.tensor([v], dtype=torch.float64) for v in (rc, rr, nc, nr)))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    h = 0.1 * ((pc - rc) - (pr - rr))
    loss, c, r = dpo(pol, ref, 0.1, 0.2)
    assert float(loss) == pytest.approx(-0.8 * math.log(sig(h)) - 0.2 * math.log(sig(-h)), rel=1e-12)
    assert (float(c), float(r)) == pytest.approx((0.1 * (pc - rc), 0.1 * (pr - rr)))
    assert float(ipo(pol, ref, 0.1)[0]) == pytest.approx(((pc - rc) - (pr - rr) - 5.0) ** 2)
    assert float(simpo(pol, 2.0, 0.5)[0]) == pytest.approx(
        -math.log(sig(2.0 * pc / nc - 2.0 * pr / nr - 0.5))
    )
    lc, lr = pc / nc, pr / nr
    odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    assert float(orpo(pol, 0.1)[0]) == pytest.approx(
        -lc - 0.1 * math.log(sig(odds(lc) - odds(lr))), rel=1e-12
    )


def test_log1m_exp_is_accurate_where_the_naive_form_fails():
    x = torch.tensor([-1e-20, -1e-8, -0.3, -5.0, -50.0], dtype=torch.float64)
    got = log1m_exp(x)
    assert torch.isfinite(got).all()
    # log(1 - e^x) = log(-x) + log(1 + x/2 + ...) near 0, and -e^x - e^{2x}/2 far below it.
    assert float(got[0]) == pytest.approx(math.log(1e-20), rel=1e-12)
    assert float(got[1]) == pytest.approx(math.log(1e-8) - 0.5e-8, rel=1e-12)
    assert float(got[4]) == pytest.approx(-math.exp(-50.0), rel=1e-12)
    assert torch.isinf(torch.log1p(-torch.exp(x[:1]))).all()  # what it replaces


# --------------------------------------------------------------------------- the training gradient
class SGDModule(CausalLMModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def quiet_trainer(**kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**{**settings, **kwargs})


def by_hand_gradient(pairs, objective: str) -> dict[str, torch.Tensor]:
    """Autograd of the mean over all pairs of the paper's loss, on whole sequences run alone."""
    module = make_module(SGDModule, objective=objective)
    reference = by_hand_logps(module._reference[0], pairs).detach() if module._reference else None
    policy = by_hand_logps(module.model, pairs)
    lengths = torch.tensor([[p[0].n_scored, p[1].n_scored] for p in pairs], dtype=torch.float64)
    if objective == "dpo":
        h = 0.1 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
        loss = -F.logsigmoid(h)
    else:  # simpo, beta 2, gamma 1
        mean = policy / lengths
        loss = -F.logsigmoid(2.0 * (mean[:, 0] - mean[:, 1]) - 1.0)
    loss.mean().backward()
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_gradient_is_the_per_pair_mean_however_the_pairs_are_batched(template, objective):
    """8 pairs as 8 x 1, 3 + 5, 1 x 8 and packed micro-batches: one SGD step moves every
    weight by the gradient of the mean pair loss over all 8 (to 1e-6)."""
    pairs = encoded_pairs(template)
    expected = by_hand_gradient(pairs, objective)
    layouts = {
        "8 x 1": ([[i] for i in range(8)], None),
        "3 + 5": ([[0, 1, 2], [3, 4, 5, 6, 7]], None),
        "1 x 8": ([list(range(8))], None),
        "packed 3 + 5": ([[0, 1, 2], [3, 4, 5, 6, 7]], ROW),
    }
    if objective == "simpo":  # the same path; one layout suffices to see its length normalisation
        layouts = {k: layouts[k] for k in ("packed 3 + 5",)}
    for name, (groups, width) in layouts.items():
        module = make_module(SGDModule, objective=objective)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        batches = [collate_pairs(pairs, g, pad_id=0, packed_width=width) for g in groups]
        quiet_trainer(max_steps=1, accumulate_grad_batches=len(groups)).fit(
            module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
        )
        for n, grad in expected.items():
            delta = before[n] - dict(module.named_parameters())[n].detach()
            torch.testing.assert_close(delta, grad.float(), atol=1e-6, rtol=1e-4, msg=f"{name}: {n}")


def test_the_reference_never_changes_while_the_policy_trains(template):
    pairs = encoded_pairs(template)
    module = make_module(SGDModule, objective="dpo")
    batch = collate_pairs(pairs, range(8), pad_id=0, packed_width=None)
    reference_before = module.reference_logps(batch)
    policy_before = reply_logps(module.model, batch)
    batches = [collate_pairs(pairs, [i, i + 4], pad_id=0, packed_width=None) for i in range(4)]
    quiet_trainer(max_steps=4).fit(
        module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    )
    reference_after = module.reference_logps(batch)
    assert torch.equal(reference_before.chosen, reference_after.chosen)
    assert torch.equal(reference_before.rejected, reference_after.rejected)
    assert not torch.allclose(policy_before.chosen, reply_logps(module.model, batch).chosen)


def test_settings_are_checked():
    with pytest.raises(UserError, match="beta must be above 0"):
        CausalLMModule(model="tiny", objective="dpo", beta=0.0)
    with pytest.raises(UserError, match="objective must be one of"):
        CausalLMModule(model="tiny", objective="kto")
    with pytest.raises(UserError, match="reference base is the LoRA base"):
        CausalLMModule(model="tiny", objective="dpo", reference="base")


# --------------------------------------------------------------------------- validation
def test_validation_scoreboard_is_exact_whatever_the_batch_size(template):
    pairs = encoded_pairs(template)
    module = make_module(objective="dpo")
    with torch.no_grad():
        policy = by_hand_logps(module.model.eval(), pairs)
        reference = by_hand_logps(module._reference[0], pairs)
    rewards = 0.1 * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    expected = {
        "loss": float(-F.logsigmoid(margin).mean()),
        "accuracy": float((margin > 0).double().mean()),
        "margin": float(margin.mean()),
        "chosen_logp": float(policy[:, 0].mean()),
        "chosen_response_loss": float(-policy[:, 0].sum() / sum(p[0].n_scored for p in pairs)),
    }
    for size in (1, 3):
        module = make_module(objective="dpo")
        batches = [collate_pairs(pairs, b, pad_id=0, packed_width=None) for b in pair_val_plan(8, size)]
        trainer = quiet_trainer(limit_val_batches=None)
        trainer.validate(module, DataLoader(batches, batch_size=None, collate_fn=lambda b: b), verbose=False)
        got = module.last_validation
        assert got["pairs"] == 8 and 0 <= got["accuracy"] <= 1
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), (size, key)


def test_pair_set_reads_consecutive_examples(template):
    pairs = encoded_pairs(template, 3)
    stored = PairSet(PairSet.flatten(pairs))
    assert len(stored) == 3 and stored[2][1] is pairs[2][1]


def test_lora_reference_is_the_base_with_its_adapters_off(template, tiny_llama_dir):
    """With LoRA the reference is the base model itself, adapters switched off: no second copy, the
    base's own log-probabilities, and unchanged by training the adapters."""
    from nexttoken.models.load import load_model

    pairs = [p for p in encoded_pairs(template, 4) if max(len(p[0]), len(p[1])) <= 64]
    batch = collate_pairs(pairs, range(len(pairs)), pad_id=0, packed_width=None)
    torch.manual_seed(0)
    module = SGDModule(model=str(tiny_llama_dir), vocab_size=320, lora={"r": 4}, objective="dpo", lr=1.0)
    module.configure_model()
    assert module._reference == [] and "adapters switched off" in module.reference_note
    base = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")[0]
    before = module.reference_logps(batch)
    torch.testing.assert_close(before.chosen, reply_logps(base, batch).chosen, atol=1e-6, rtol=0)
    policy_before = reply_logps(module.model, batch).chosen
    loader = DataLoader([batch] * 3, batch_size=None, collate_fn=lambda b: b)
    quiet_trainer(max_steps=3).fit(module, train_dataloaders=loader)
    after = module.reference_logps(batch)
    assert torch.equal(before.chosen, after.chosen) and torch.equal(before.rejected, after.rejected)
    assert not torch.allclose(policy_before, reply_logps(module.model, batch).chosen)


# --------------------------------------------------------------------------- nexttoken fit
def write_pairs(path, n: int = 24, **changes) -> None:
    rows = [{**r, **changes} for r in records(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pref_fit_args(path, tmp_path, *extra: str) -> list[str]:
    return [
        "fit",
        "--data.path",
        str(path),
        "--data.tokenizer",
        "bytes",
        "--data.block_size",
        "64",
        "--data.batch_size",
        "4",
        "--data.val_fraction",
        "0.25",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--model.n_layer",
        "1",
        "--model.n_head",
        "2",
        "--model.n_embd",
        "32",
        "--trainer.max_steps",
        "3",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_fit_trains_on_pairs_and_reports_the_scoreboard(tmp_path, capsys, objective):
    from nexttoken.cli import main

    path = tmp_path / "pairs.jsonl"
    write_pairs(path)
    assert main(pref_fit_args(path, tmp_path, "--model.objective", objective)) == 0
    out = capsys.readouterr().out
    assert "format: preference (auto" in out and "data: train 19 pairs" in out and "validation 5 pairs" in out
    assert f"objective: {objective}" in out
    assert ("reference: a frozen copy of the starting weights" in out) == (objective == "dpo")
    report = json.loads(next((tmp_path / "runs").glob("version_*/report.json")).read_text())
    validation = report["validation"]
    assert validation["pairs"] == 5 and 0 <= validation["accuracy"] <= 1
    assert validation["loss"] == pytest.approx(validation["sums"]["loss"] / 5)
    run = next((tmp_path / "runs").glob("version_*"))
    assert (run / "curves.png").is_file()
    if objective == "dpo":
        check_eval_scoreboard(run / "checkpoints" / "last.ckpt", path, capsys)


def check_eval_scoreboard(checkpoint, path, capsys) -> None:
    """``nexttoken eval``: the model as its own reference gives DPO's loss log 2 and zero rewards
    (ties: accuracy 0); without one, the summed log-probs are the model's own, computed by hand."""
    from nexttoken.cli import main
    from nexttoken.models.load import load_model

    assert main(["eval", str(checkpoint), str(path), "--reference", str(checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 24 and result["loss"] == pytest.approx(math.log(2), abs=1e-12)
    assert (result["accuracy"], result["margin"], result["chosen_reward"]) == (0, 0, 0)
    assert main(["eval", str(checkpoint), str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, tokenizer = load_model(str(checkpoint), dtype="float32", device="cpu")
    pairs = [encode_pair(resolve_chat_template(tokenizer), to_pair(r, "r")) for r in records(24)]
    with torch.no_grad():
        expected = by_hand_logps(model.eval(), pairs)
    assert result["chosen_logp"] == pytest.approx(float(expected[:, 0].mean()), abs=1e-5)
    assert result["accuracy"] == float((expected[:, 0] > expected[:, 1]).double().mean())
    assert result["loss"] is None and set(result["sums"]) >= {"pairs", "loss", "chosen_tokens"}


@pytest.mark.parametrize(
    "extra, changes, message",
    [
        (("--model.objective", "dpo", "--model.beta", "0"), {}, "--model.beta must be above 0"),
        (("--model.objective", "dpo", "--model.reference", "base"), {}, "--model.reference base is the LoRA"),
        ((), {}, "the data are preference pairs; train on them with --model.objective"),
        (
            ("--model.objective", "dpo"),
            {"chosen": "same", "rejected": "same"},
            "identical chosen and rejected",
        ),
    ],
)
def test_fit_refuses_bad_preference_settings(tmp_path, capsys, extra, changes, message):
    from nexttoken.cli import main

    path = tmp_path / "pairs.jsonl"
    write_pairs(path, **changes)
    assert main(pref_fit_args(path, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not list((tmp_path / "runs").glob("version_*"))


def test_fit_names_the_record_missing_rejected(tmp_path, capsys):
    from nexttoken.cli import main

    path = tmp_path / "pairs.jsonl"
    write_pairs(path)
    lines = path.read_text().splitlines()
    lines[4] = json.dumps({"prompt": "x", "chosen": "y"})
    path.write_text("\n".join(lines) + "\n")
    assert main(pref_fit_args(path, tmp_path, "--model.objective", "dpo")) == 2
    assert "pairs.jsonl line 5 has no 'rejected'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_parity_on_smollm2_with_its_own_forward_and_the_papers_formula(smollm2_gguf):
    """SmolLM2-135M-Instruct, its own chat template, 4 pairs: the DPO loss and rewards fit computes
    for a batch equal the transformers model's own forward (each reply alone, log-softmax in float64,
    summed over the reply's tokens) put through DPO's formula, to 1e-5; the policy is nudged first
    so that it differs from its frozen reference."""
    from nexttoken.data.tokenizers import load_local_tokenizer

    tokenizer = load_local_tokenizer(smollm2_gguf)
    template = resolve_chat_template(tokenizer)
    pairs = [encode_pair(template, to_pair(r, "r")) for r in records(4)]
    module = CausalLMModule(
        model=str(smollm2_gguf), vocab_size=tokenizer.vocab_size, objective="dpo", beta=0.1
    )
    module.tokenizer = tokenizer
    module.configure_model()
    with torch.no_grad():
        torch.manual_seed(0)
        for p in module.model.model.model.layers[-1].mlp.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = collate_pairs(pairs, range(4), pad_id=0, packed_width=None)
    with torch.no_grad():
        _, loss, chosen, rejected = module.pair_terms(batch, grad=False)

    def own_forward(hf_model) -> torch.Tensor:
        out = []
        for pair in pairs:
            row = []
            for example in pair:
                tokens = torch.from_numpy(example.tokens)
                logp = hf_model(tokens[None, :-1]).logits[0].double().log_softmax(-1)
                row.append(
                    logp.gather(-1, tokens[1:, None])[:, 0][torch.from_numpy(example.scored[1:])].sum()
                )
            out.append(torch.stack(row))
        return torch.stack(out)

    with torch.no_grad():
        policy = own_forward(module.model.model.eval())
        reference = own_forward(module._reference[0].model)
    rewards = 0.1 * (policy - reference)
    expected_loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    assert float((rewards[:, 0] - rewards[:, 1]).abs().max()) > 1e-3  # the nudge really moved the policy
    torch.testing.assert_close(chosen, rewards[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, rewards[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)


# ChatML as SmolLM2 writes it, but with the newline between turns put before the next turn instead of
# after <|im_end|>: TRL scores every token after the prompt (its completion runs to the end of the
# rendered text), nexttoken the reply through its end-of-turn token, so with SmolLM2's own template TRL
# would also score the "\n" after <|im_end|>. With this one both score exactly the reply and <|im_end|>.
CHATML_NO_TRAILING_NEWLINE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.slow
def test_dpo_loss_equals_trls_dpo_trainer_on_smollm2(smollm2_gguf, tmp_path):
    """TRL's DPOTrainer and nexttoken's fit give the same DPO loss (beta 0.1) for the same model,
    reference, 4 conversational pairs and template, to 1e-5."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from nexttoken.data.tokenizers import load_local_tokenizer

    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML_NO_TRAILING_NEWLINE)
    tokenizer = load_local_tokenizer(smollm2_gguf)
    ours = resolve_chat_template(tokenizer, template_file)
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in records(4)
    ]
    pairs = [encode_pair(ours, to_pair(r, "r")) for r in rows]
    module = CausalLMModule(
        model=str(smollm2_gguf), vocab_size=tokenizer.vocab_size, objective="dpo", beta=0.1
    )
    module.tokenizer = tokenizer
    module.configure_model()
    with torch.no_grad():
        torch.manual_seed(0)
        for p in module.model.model.model.layers[-1].mlp.parameters():
            p.add_(0.02 * torch.randn_like(p))
        _, loss, _, _ = module.pair_terms(
            collate_pairs(pairs, range(4), pad_id=0, packed_width=None), grad=False
        )

    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    hf_tokenizer.chat_template = CHATML_NO_TRAILING_NEWLINE
    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
    )
    trainer = DPOTrainer(
        model=module.model.model,
        ref_model=module._reference[0].model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=hf_tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    assert float(loss.mean()) == pytest.approx(float(trl_loss), abs=1e-5)
    assert float(loss.mean()) > math.log(2) + 1e-4 or float(loss.mean()) < math.log(2) - 1e-4  # not a tie


def test_fit_refuses_a_preference_objective_on_chat_data(tmp_path, capsys):
    from nexttoken.cli import main

    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["chosen"]},
                    ]
                }
            )
            + "\n"
            for r in records(24)
        )
    )
    assert main(pref_fit_args(path, tmp_path, "--model.objective", "simpo")) == 2
    err = capsys.readouterr().err
    assert "--model.objective simpo trains on preference pairs" in err and "the data are chat" in err, err
    assert not list((tmp_path / "runs").glob("version_*"))


def test_a_cached_reference_trains_as_the_copy_does(tmp_path, capsys):
    """``--model.reference cached`` (the starting weights' log-probabilities computed once) and
    ``copy`` (a frozen model run every step) give the same run: the same validation numbers."""
    from nexttoken.cli import main

    path = tmp_path / "pairs.jsonl"
    write_pairs(path)
    reports = {}
    for mode in ("copy", "cached"):
        root = tmp_path / mode
        args = pref_fit_args(path, root, "--model.objective", "dpo", "--model.reference", mode)
        assert main([*args, "--trainer.precision", "32-true"]) == 0
        out = capsys.readouterr().out
        assert ("computed once" in out) == (mode == "cached")
        reports[mode] = json.loads(next((root / "runs").glob("version_*/report.json")).read_text())[
            "validation"
        ]
    for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp"):
        assert reports["cached"][key] == pytest.approx(reports["copy"][key], abs=1e-5), key
