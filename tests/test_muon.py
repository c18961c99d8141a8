"""Muon beside AdamW (``--model.optimizer muon``): which parameters each optimizer gets, Muon's update
against the Newton-Schulz iteration written out by hand, decay, state round trips, and fit end to end."""

import copy

import pytest
import torch

from nexttoken.cli import main
from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.training.muon import BatchedMuon
from nexttoken.training.optim import (
    MUON_WHY,
    MuonWithAdamW,
    build_optimizer,
    decay_audit,
    param_groups,
)
from test_cli import fit_args, metric_rows, write_corpus
from test_optim import TinyNanoGPT, lora_nanogpt

# torch's default quintic coefficients (Keller Jordan's), written here, not read from torch.
A, B, C = 3.4445, -4.7750, 2.0315


def newton_schulz_by_hand(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """X0 = G / ||G||_F (on the wide side), then X <- a X + (b XX^T + c (XX^T)^2) X, in float64."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


def muon_names(model, **kwargs) -> set[str]:
    return {r.name for r in decay_audit(model, "muon", **kwargs).records if r.optimizer == "muon"}


def groups_by_name(optimizer) -> dict[str, set[int]]:
    return {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}


# ------------------------------------------------------------------ which parameter goes where
def test_builtin_gpt_hidden_matrices_to_muon_embeddings_head_norms_to_adamw():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True))
    audit = decay_audit(model, "muon")
    expected = {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert muon_names(model) == expected
    why = {r.name: (r.optimizer, r.optimizer_reason) for r in audit.records}
    assert why["wte.weight"] == ("adamw", "embedding (tied output head)")
    assert why["wpe.weight"] == ("adamw", "embedding")
    assert why["ln_f.weight"] == ("adamw", "norm") and why["blocks.0.attn.c_attn.bias"] == ("adamw", "bias")
    assert why["blocks.1.mlp.c_fc.weight"] == ("muon", MUON_WHY)
    table = audit.table()
    assert "optimizer" in table.splitlines()[0]
    assert "muon: hidden matrix" in table and "adamw: embedding (tied output head)" in table
    split = audit.optimizer_split()
    n_muon = sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert split.startswith(f"muon on 8 tensors ({n_muon:,} params")
    # The optimizer holds exactly what the audit says, the embedding (= the tied head) in AdamW.
    optimizer, _ = build_optimizer(model, lr=1e-3, optimizer="muon")
    assert isinstance(optimizer, MuonWithAdamW)
    muon_ids = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for n, p in model.named_parameters() if n in expected}
    assert id(model.wte.weight) not in muon_ids and id(model.lm_head.weight) not in muon_ids
    assert id(model.wte.weight) in {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    # An AdamW run: every parameter with AdamW, as before.
    assert {r.optimizer for r in decay_audit(model).records} == {"adamw"}


def test_hf_gpt2_conv1d_projections_to_muon_tied_head_never():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
    }
    assert len(expected) == 8 and muon_names(model) == expected
    records = {r.name: r for r in decay_audit(model, "muon").records}
    assert records["transformer.wte.weight"].optimizer_reason == "embedding (tied output head)"
    assert records["transformer.wpe.weight"].optimizer == "adamw"


@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_projections_to_muon_untied_head_stays_with_adamw(tied):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {
        n for n, _ in model.named_parameters() if n.endswith(tuple(f"{x}.weight" for x in projections))
    }
    assert len(expected) == 14 and muon_names(model) == expected
    records = {r.name: r for r in decay_audit(model, "muon").records}
    if not tied:
        # A matmul weight under the Golden Rule (decayed), but the output head: AdamW's.
        head = records["lm_head.weight"]
        assert head.decay and (head.optimizer, head.optimizer_reason) == ("adamw", "output head")
        decay, no_decay, _, muon, _ = param_groups(model, 0.1, optimizer="muon")
        assert [id(p) for p in decay["params"]] == [id(model.lm_head.weight)]
        assert decay["optimizer"] == "adamw" and muon["optimizer"] == "muon"
    assert records["model.embed_tokens.weight"].optimizer == "adamw"
    assert records["model.norm.weight"].optimizer_reason == "norm"


def test_lora_adapters_stay_with_adamw_unless_asked():
    model = lora_nanogpt(**{"blocks.0.mlp.0.base_layer.weight": True})
    audit = decay_audit(model, "muon")
    adapters = [r for r in audit.records if ".lora_" in r.name]
    assert adapters and {(r.optimizer, r.optimizer_reason) for r in adapters} == {
        ("adamw", "lora adapter (low-rank factor)")
    }
    assert muon_names(model) == {"blocks.0.mlp.0.base_layer.weight"}  # an unfrozen hidden matrix
    assert muon_names(model, muon_adapters=True) == {"blocks.0.mlp.0.base_layer.weight"} | {
        r.name for r in adapters
    }
    # Adapters alone train: nothing for Muon, and AdamW alone is built.
    optimizer, _ = build_optimizer(lora_nanogpt(), lr=1e-3, optimizer="muon")
    assert isinstance(optimizer, torch.optim.AdamW)
    optimizer, _ = build_optimizer(
        lora_nanogpt(), lr=1e-3, optimizer="muon", muon_adapters=True, weight_decay=0.5
    )
    assert isinstance(optimizer, torch.optim.Muon)
    assert [g["name"] for g in optimizer.param_groups] == ["muon_lora"]


# ------------------------------------------------------------------ the update itself
def test_muon_update_is_the_newton_schulz_iteration_of_the_nesterov_momentum():
    torch.manual_seed(0)
    model = TinyNanoGPT(vocab=50, d=8)
    weight = model.blocks[0].attn.weight  # 24 x 8: tall, so the iteration runs on its transpose
    lr, momentum = 0.1, 0.95
    optimizer, _ = build_optimizer(
        model, lr=lr, weight_decay=0.0, warmup_steps=0, max_steps=1000, optimizer="muon"
    )  # defaults: Moonlight's lr scale, momentum 0.95, Nesterov
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(lr)
    scale = lr * 0.2 * max(weight.shape) ** 0.5  # match_rms_adamw: lr x 0.2 sqrt(max(A, B))
    grads = [torch.randn_like(weight) for _ in range(2)]
    buffer = torch.zeros_like(weight, dtype=torch.float64)
    for grad in grads:
        before = weight.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        weight.grad = grad.clone()
        optimizer.step()
        update = (before - weight.detach()).double() / scale
        buffer = momentum * buffer + grad.double()  # B_t = mu B_{t-1} + g_t
        expected = newton_schulz_by_hand(grad.double() + momentum * buffer)  # Nesterov: g_t + mu B_t
        # torch runs the iteration in bf16: a few per cent apart; one step fewer, the exact polar factor
        # or plain momentum instead of Nesterov are 10-40% apart.
        assert (update - expected).norm() / expected.norm() < 0.04
        assert (
            newton_schulz_by_hand(grad.double() + momentum * buffer, 4) - expected
        ).norm() > 0.1 * expected.norm()
        u, _, v = torch.linalg.svd(expected, full_matrices=False)
        assert (u @ v - expected).norm() > 0.1 * expected.norm()


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_gives_every_matrix_torchs_muon_update(adjust, nesterov):
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 8), (8, 24), (24, 8), (8, 24), (16, 8)]  # tall, square, wide; repeated shapes
    mine = [torch.randn(shape, requires_grad=True) for shape in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in mine]
    settings = dict(lr=0.05, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    batched, reference = BatchedMuon(mine, **settings), torch.optim.Muon(theirs, **settings)
    for step in range(3):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        if step == 2:  # a matrix without a gradient is left alone by both
            mine[1].grad = theirs[1].grad = None
        batched.step()
        reference.step()
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The same state: a checkpoint of one continues in the other.
    assert batched.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    for key, value in reference.state_dict()["state"].items():
        torch.testing.assert_close(
            batched.state_dict()["state"][key]["momentum_buffer"], value["momentum_buffer"]
        )


def test_muon_decay_is_decoupled_and_only_on_its_matrices():
    torch.manual_seed(0)
    model = TinyNanoGPT()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.5, 0.1
    optimizer, _ = build_optimizer(model, lr=lr, weight_decay=wd, warmup_steps=0, optimizer="muon")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's and Muon's steps are then 0: only the decay moves weights
    optimizer.step()
    muon = muon_names(model)
    assert muon
    for name, p in model.named_parameters():
        expected = before[name] * (1 - lr * wd) if name in muon else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_state_dict_round_trips_and_the_schedule_scales_both():
    def steps(model, optimizer, schedule, n, seed):
        torch.manual_seed(seed)
        for _ in range(n):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
            schedule.step()

    def build(model):
        return build_optimizer(model, lr=1e-2, muon_lr=2e-2, warmup_steps=2, max_steps=20, optimizer="muon")

    torch.manual_seed(0)
    model = TinyNanoGPT()
    optimizer, schedule = build(model)
    steps(model, optimizer, schedule, 3, seed=1)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["muon"] / 2e-2 == pytest.approx(lrs["no_decay"] / 1e-2)  # one schedule, each its own peak
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), schedule.state_dict()))
    steps(model, optimizer, schedule, 3, seed=2)

    resumed = TinyNanoGPT()
    resumed.load_state_dict(saved[0])
    optimizer2, schedule2 = build(resumed)
    optimizer2.load_state_dict(saved[1])
    schedule2.load_state_dict(saved[2])
    assert (
        optimizer2.muon.state is optimizer2.state
        and optimizer2.muon.param_groups[0] is optimizer2.param_groups[-1]
    )
    steps(resumed, optimizer2, schedule2, 3, seed=2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ fit end to end
@pytest.mark.slow
def test_fit_with_muon_resumes_the_same_curve_and_says_what_it_runs(tmp_path, capsys):
    # bf16-mixed where this CPU has it (the default precision), as a user's run.
    corpus = write_corpus(tmp_path / "corpus", n_docs=3, words_per_doc=300)
    cache, muon = tmp_path / "cache", ["--model.optimizer", "muon", "--model.muon_lr", "0.01"]
    full_root, cut_root = tmp_path / "full", tmp_path / "cut"
    assert main(fit_args(corpus, full_root, cache, 20, *muon)) == 0
    out = capsys.readouterr().out
    assert "optimizer: muon (lr 0.01 [--model.muon_lr]" in out and "--model.muon_momentum" in out
    assert "muon on 4 tensors" in out and "1 embedding (tied output head)" in out
    stop = ["--trainer.callbacks+=test_cli.StopAtStep", "--trainer.callbacks.step=10"]
    assert main(fit_args(corpus, cut_root, cache, 20, *muon, *stop)) == 0
    # No --model.optimizer here: the checkpoint's (muon) is the run's.
    assert main(fit_args(corpus, cut_root, cache, 20, "--ckpt_path", "last")) == 0
    checkpoint = torch.load(cut_root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"] == "muon"
    assert [g["name"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == ["no_decay", "muon"]
    full = metric_rows(full_root / "version_0", "train/loss")
    resumed = metric_rows(cut_root / "version_0", "train/loss")
    assert sorted(resumed) == sorted(full) and any(s >= 10 for s in full)
    for s in full:
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-6), s
    full_val = metric_rows(full_root / "version_0", "val/loss")
    assert metric_rows(cut_root / "version_0", "val/loss")[19] == pytest.approx(full_val[19], rel=1e-6)
    assert metric_rows(full_root / "version_0", "train/lr_muon")
    # An AdamW run continued with Muon is refused in one line: its optimizer state fits AdamW only.
    assert main(fit_args(corpus, tmp_path / "adamw", cache, 2)) == 0
    capsys.readouterr()
    adamw_ckpt = str(tmp_path / "adamw" / "version_0" / "checkpoints" / "last.ckpt")
    assert main(fit_args(corpus, tmp_path / "adamw", cache, 4, "--ckpt_path", adamw_ckpt, *muon[:2])) == 2
    assert "--model.optimizer muon (checkpoint: adamw)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, expect",
    [
        (["--model.optimizer", "sgd"], "error: --model.optimizer 'sgd' is not one of adamw, muon; "),
        (["--model.muon_momentum", "1.5"], "error: --model.muon_momentum must be in [0, 1), got 1.5"),
        (["--model.muon_lr", "0"], "error: --model.muon_lr must be positive, got 0.0"),
        (
            ["--model.muon_adjust_lr", "none"],
            "error: --model.muon_adjust_lr 'none' is not one of match_rms_adamw, original; ",
        ),
    ],
)
def test_bad_muon_settings_are_one_line(tmp_path, capfd, flag, expect):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, words_per_doc=50)
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 1, *flag)) == 2
    err = capfd.readouterr().err
    assert err.startswith(expect) and len(err.strip().splitlines()) == 1
