"""LoRA: adapters injected by peft into nexttoken's GPT and Hugging Face models, trained alone on a frozen
base, saved as adapter-only checkpoints tied to their base by sha256, exported as PEFT folders (that
``peft.PeftModel`` loads) or merged, and applied by ``eval``/``generate``/``inspect --adapter``."""

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nexttoken.cli import main
from nexttoken.errors import UserError
from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.models.lora import (
    LoraSettings,
    adapted_network,
    attach_lora,
    default_targets,
    describe_modules,
    merge_lora,
    weights_fingerprint,
)
from nexttoken.models.protocol import CausalLM
from test_cli import fit_args, write_corpus
from test_export import eval_json as eval_json_of

SCALE = 2.0  # alpha / r in the tests below


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()


def randomize_adapters(network: nn.Module, seed: int = 1) -> None:
    """A trained-looking adapter: B is zero at the start (the update would vanish), so fill A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def lora_pairs(network: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module name: (base weight as (out, in), A, B)} for every adapted module, read independently of peft."""
    pairs = {}
    for name, module in adapted_network(network).named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach()
            if type(module.base_layer).__name__ == "Conv1D":
                weight = weight.t()  # Conv1D stores (in, out)
            pairs[name] = (
                weight,
                module.lora_A["default"].weight.detach(),
                module.lora_B["default"].weight.detach(),
            )
    return pairs


# --------------------------------------------------------------------------- attaching, the protocol, merging
def test_attach_to_gpt_keeps_the_protocol_freezes_the_base_and_starts_at_the_base():
    network = tiny_gpt()
    x = torch.randint(0, 64, (2, 12))
    before = network(x).detach()
    matched = attach_lora(network, LoraSettings(r=4, alpha=8))
    assert isinstance(network, GPT) and isinstance(network, CausalLM)
    assert matched == [
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    trainable = [n for n, p in network.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not network.wte.weight.requires_grad and not network.blocks[0].ln_1.weight.requires_grad
    # B starts at zero: the adapted model is exactly the base model until it trains.
    torch.testing.assert_close(network(x), before, rtol=0, atol=0)
    # The protocol's other paths see the adapters too.
    randomize_adapters(network)
    torch.testing.assert_close(network.lm_head(network.hidden(x)), network(x))
    assert network.generate(x[:1, :4], 3, temperature=0).shape == (1, 7)


def test_adapted_gpt_computes_base_plus_scaled_BA_by_hand():
    network = tiny_gpt()
    reference = tiny_gpt()  # the same weights (same seed)
    attach_lora(network, LoraSettings(r=4, alpha=8))
    randomize_adapters(network)
    with torch.no_grad():
        for name, (_, A, B) in lora_pairs(network).items():
            reference.get_submodule(name).weight += SCALE * B @ A
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(network(x), reference(x), rtol=1e-5, atol=1e-5)
    assert (network(x) - tiny_gpt()(x)).abs().max() > 1e-2  # the adapter really changes the logits


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_hf_default_targets_are_the_projections_and_merge_is_exact(fixture, request):
    network, _ = load_hf_causal_lm(request.getfixturevalue(fixture))
    expected = {
        "tiny_gpt2_dir": ["c_attn", "c_fc", "c_proj"],
        "tiny_llama_dir": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    }[fixture]
    assert default_targets(network) == expected  # never the output head
    matched = attach_lora(network, LoraSettings(r=4, alpha=8))
    assert not any("lm_head" in m for m in matched) and isinstance(network, CausalLM)
    randomize_adapters(network)
    pairs = lora_pairs(network)
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        unmerged = network(x)
    merge_lora(network)
    assert not any(".lora_" in n for n, _ in network.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(network(x), unmerged, rtol=1e-5, atol=1e-5)
        for name, (weight, A, B) in pairs.items():
            merged = adapted_network(network).get_submodule(name).weight
            merged = (
                merged.t()
                if type(adapted_network(network).get_submodule(name)).__name__ == "Conv1D"
                else merged
            )
            torch.testing.assert_close(merged, weight + SCALE * B @ A)


def test_base_held_in_bf16_changes_nothing_under_bf16_autocast(tiny_llama_dir):
    """bf16 autocast rounds each fp32 weight to bf16 for its matmul: holding the frozen base in bf16
    gives the same loss and the same adapter gradients, bit for bit."""
    from nexttoken.loss import next_token_loss
    from nexttoken.models.lora import hold_base_weights

    results = []
    for hold in (False, True):
        network, _ = load_hf_causal_lm(tiny_llama_dir)
        attach_lora(network, LoraSettings(r=4, alpha=8))
        randomize_adapters(network)
        if hold:
            assert hold_base_weights(network, torch.bfloat16) > 0
            assert {p.dtype for n, p in network.named_parameters() if "base_layer" in n} == {torch.bfloat16}
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 100, (2, 12), generator=g), torch.randint(0, 100, (2, 12), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = next_token_loss(network(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in network.parameters() if p.requires_grad]))
    (loss32, grads32), (loss16, grads16) = results
    assert torch.equal(loss32, loss16)
    assert len(grads32) == len(grads16) > 0 and all(torch.equal(a, b) for a, b in zip(grads32, grads16))


def test_targets_that_match_nothing_list_the_modules_that_exist():
    with pytest.raises(UserError, match="match no module.*c_attn, c_fc, c_proj, lm_head, wpe, wte"):
        attach_lora(tiny_gpt(), LoraSettings(r=4, alpha=8, targets=("q_proj",)))


def test_a_tied_head_cannot_be_a_target():
    with pytest.raises(UserError, match="lm_head shares its weight with the input embedding"):
        attach_lora(tiny_gpt(), LoraSettings(r=4, alpha=8, targets=("c_fc", "lm_head")))


def test_describe_modules_compacts_layer_numbers():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(30)] + [
        "blocks.0.mlp.c_fc",
        "blocks.2.mlp.c_fc",
    ]
    names.append("lm_head")
    assert describe_modules(names) == [
        "model.layers.{0-29}.self_attn.q_proj",
        "blocks.{0,2}.mlp.c_fc",
        "lm_head",
    ]


def test_fingerprint_is_the_sha256_of_the_weights_files(tiny_gpt2_dir, tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    assert weights_fingerprint(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    shards = sorted(tiny_gpt2_dir.glob("*.safetensors"))
    assert (
        weights_fingerprint(tiny_gpt2_dir)
        == hashlib.sha256(b"".join(s.read_bytes() for s in shards)).hexdigest()
    )


# --------------------------------------------------------------------------- the CLI, end to end
def lora_fit_args(base: Path, corpus: Path, root: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--model.model",
        str(base),
        "--model.lora.r",
        "4",
        "--model.lr",
        "3e-2",
        "--model.warmup_steps",
        "1",
        "--data.path",
        str(corpus),
        "--data.block_size",
        "32",
        "--data.batch_size",
        "2",
        "--data.val_fraction",
        "0.3",
        "--data.cache_dir",
        str(cache),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "4",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def hf_run(tiny_gpt2_dir, tmp_path_factory):
    """A LoRA run on the tiny GPT-2 folder: (base, corpus, checkpoint, a text to score)."""
    tmp = tmp_path_factory.mktemp("lora-hf")
    corpus = write_corpus(tmp / "corpus", n_docs=3, words_per_doc=200)
    assert main(lora_fit_args(tiny_gpt2_dir, corpus, tmp / "runs", tmp / "cache", 8)) == 0
    text = tmp / "text.txt"
    text.write_text("The queen of the river was the light of the castle.\n" * 3)
    return tiny_gpt2_dir, corpus, tmp / "runs" / "version_0" / "checkpoints" / "last.ckpt", text


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A built-in GPT trained a few steps (the base), then a LoRA run on it."""
    tmp = tmp_path_factory.mktemp("lora-gpt")
    corpus = write_corpus(tmp / "corpus", n_docs=3, words_per_doc=200)
    assert main(fit_args(corpus, tmp / "base", tmp / "cache", 4, "--trainer.precision", "32-true")) == 0
    base = tmp / "base" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(lora_fit_args(base, corpus, tmp / "runs", tmp / "cache", 8)) == 0
    text = tmp / "text.txt"
    text.write_text("The queen of the river was the light of the castle.\n" * 3)
    return base, corpus, tmp / "runs" / "version_0" / "checkpoints" / "last.ckpt", text


def eval_json(capsys, model: Path, text: Path, *extra) -> dict:
    return eval_json_of(capsys, model, text, "--context", "32", *map(str, extra))


def test_checkpoint_holds_the_adapter_its_optimizer_state_and_the_base_fingerprint(hf_run):
    base, _, ckpt, _ = hf_run
    checkpoint = torch.load(ckpt, weights_only=True)
    names = list(checkpoint["state_dict"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert (
        checkpoint["lora"]["sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    )
    assert checkpoint["lora"]["base_model"] == str(base)
    assert (
        len(checkpoint["lora"]["modules"]) == 8
    )  # 2 layers x c_attn, c_proj (attention), c_fc, c_proj (MLP)
    state = checkpoint["optimizer_states"][0]["state"]
    assert len(state) == len(names)  # AdamW moments for the adapters and nothing else
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(
        checkpoint["state_dict"][n].numel() for n in names
    )
    # Trained: B is no longer zero, so every comparison below sees a real update.
    assert min(checkpoint["state_dict"][n].abs().max() for n in names if ".lora_B." in n) > 1e-3


def test_bf16_mixed_fit_holds_the_base_in_bf16_and_gives_it_back_in_fp32(gpt_run, tmp_path, capsys):
    base, corpus, _, _ = gpt_run
    argv = lora_fit_args(base, corpus, tmp_path / "runs", tmp_path / "cache", 2)
    argv[argv.index("--trainer.precision") + 1] = "bf16-mixed"
    assert main(argv) == 0  # the end-of-run report samples text outside autocast: the base is fp32 again
    assert "frozen weights held in bf16 while bf16-mixed trains" in capsys.readouterr().out


def test_base_is_frozen_and_unchanged_by_training(hf_run):
    from nexttoken.models.load import load_checkpoint

    base, _, ckpt, _ = hf_run
    module = load_checkpoint(ckpt)
    original, _ = load_hf_causal_lm(base)
    trained = {
        n.replace(".base_layer", ""): p for n, p in module.network.named_parameters() if ".lora_" not in n
    }
    for name, p in original.named_parameters():
        assert torch.equal(trained[name], p), name
        assert trained[name].dtype == torch.float32


@pytest.mark.parametrize("run", ["hf_run", "gpt_run"])
def test_eval_with_adapter_export_peft_load_merge_all_agree(run, request, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nexttoken.models.load import load_checkpoint

    base, _, ckpt, text = request.getfixturevalue(run)
    with_ckpt = eval_json(capsys, base, text, "--adapter", ckpt)
    alone = eval_json(capsys, ckpt, text)  # the checkpoint finds its base by the path it recorded
    assert alone["nll_sum"] == pytest.approx(with_ckpt["nll_sum"], rel=1e-9)
    plain = eval_json(capsys, base, text)
    assert abs(plain["nll_sum"] - with_ckpt["nll_sum"]) > 1e-3  # the adapter matters

    adapter = tmp_path / "adapter"
    assert main(["export", str(ckpt), str(adapter)]) == 0
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert eval_json(capsys, base, text, "--adapter", adapter)["nll_sum"] == pytest.approx(
        with_ckpt["nll_sum"], rel=1e-7
    )

    # PEFT itself loads the folder onto the base (the Hugging Face export, for the built-in GPT).
    hf_base = base
    if run == "gpt_run":
        hf_base = tmp_path / "base-hf"
        assert main(["export", str(base), str(hf_base)]) == 0
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base), str(adapter)).eval()
    module = load_checkpoint(ckpt)
    x = torch.tensor([module.tokenizer.encode(text.read_text())[:32]])
    with torch.no_grad():
        ours = module.network(x)
        torch.testing.assert_close(peft_model(x).logits, ours, rtol=1e-5, atol=1e-5)
        assert (ours - AutoModelForCausalLM.from_pretrained(hf_base)(x).logits).abs().max() > 1e-3

    merged = tmp_path / "merged"
    assert main(["export", str(ckpt), str(merged), "--merge"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(merged)(x).logits, ours, rtol=1e-5, atol=1e-5
        )
    from_merged = eval_json(capsys, merged, text)
    assert from_merged["tokens"] == with_ckpt["tokens"]
    assert from_merged["perplexity"] == pytest.approx(with_ckpt["perplexity"], rel=1e-6)


def test_generate_and_inspect_take_an_adapter(hf_run, tmp_path, capsys):
    base, _, ckpt, text = hf_run
    outputs = {}
    for adapter in ([], ["--adapter", str(ckpt)]):
        capsys.readouterr()
        assert (
            main(
                [
                    "generate",
                    str(base),
                    "--prompt",
                    "The",
                    "--max-new-tokens",
                    "12",
                    "--temperature",
                    "0",
                    *adapter,
                ]
            )
            == 0
        )
        outputs[bool(adapter)] = capsys.readouterr().out
    capsys.readouterr()
    assert (
        main(["generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    )
    assert capsys.readouterr().out == outputs[True]
    assert outputs[True] != outputs[False]
    page = tmp_path / "page.html"
    assert (
        main(
            ["inspect", str(base), str(text), "--adapter", str(ckpt), "--context", "32", "--html", str(page)]
        )
        == 0
    )
    summary = capsys.readouterr().out.splitlines()[0]
    bits = eval_json(capsys, base, text, "--adapter", ckpt)["bits_per_byte"]
    assert f"{bits:.4f} bits per byte" in summary and page.is_file()


def test_resume_continues_the_same_curve(gpt_run, tmp_path):
    """Stopped at step 6 and resumed from its adapter-only checkpoint, a LoRA run logs the same losses
    as an uninterrupted one. (The built-in GPT has no dropout: torch's random state is not part of a
    checkpoint, so a model with dropout would not resume exactly.)"""
    base, corpus, _, _ = gpt_run
    cache = tmp_path / "cache"
    full, cut = tmp_path / "full", tmp_path / "cut"
    every_step = ("--trainer.log_every_n_steps", "1")
    assert main(lora_fit_args(base, corpus, full, cache, 12, *every_step)) == 0
    stop = ["--trainer.callbacks+=test_cli.StopAtStep", "--trainer.callbacks.step=6"]
    assert main(lora_fit_args(base, corpus, cut, cache, 12, *every_step, *stop)) == 0
    assert main(lora_fit_args(base, corpus, cut, cache, 12, *every_step, "--ckpt_path", "last")) == 0
    whole, resumed = logged(full, "train/loss"), logged(cut, "train/loss")
    assert len(whole) == len(resumed) == 12 and len(set(whole)) > 6  # every step, and it trains
    assert resumed == pytest.approx(whole, rel=1e-6, abs=1e-6)
    assert logged(cut, "val/loss")[-1] == pytest.approx(logged(full, "val/loss")[-1], rel=1e-6)


def logged(root: Path, name: str) -> list[float]:
    """The values of one metric in the order the run folder's metrics.csv holds them."""
    with open(root / "version_0" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


# --------------------------------------------------------------------------- bad input: one line, exit 2
def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err  # (progress bars of loading may come before it)
    assert "Traceback" not in err and err.count("error: ") == 1
    line = err.strip().splitlines()[-1].split("\r")[-1]
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("rank", ["0", "-4"])
def test_rank_must_be_positive(rank, tiny_gpt2_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2)
    argv = lora_fit_args(tiny_gpt2_dir, corpus, tmp_path / "runs", tmp_path / "cache", 2)
    argv[argv.index("--model.lora.r") + 1] = rank
    assert "--model.lora.r must be a positive rank" in one_line_error(capsys, argv)
    assert not (tmp_path / "runs").exists()


def test_targets_that_match_nothing(tiny_llama_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2)
    argv = lora_fit_args(
        tiny_llama_dir, corpus, tmp_path / "runs", tmp_path / "cache", 2, "--model.lora.targets", "[c_attn]"
    )
    err = one_line_error(capsys, argv)
    assert "match no module" in err and "q_proj" in err and "down_proj" in err and "embed_tokens" in err


def test_lora_on_a_preset_with_random_weights(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2)
    err = one_line_error(
        capsys, [*fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2), "--model.lora.r", "4"]
    )
    assert "adapts a pretrained model" in err


def test_merge_of_a_run_that_is_not_lora(gpt_run, tmp_path, capsys):
    base, _, _, _ = gpt_run
    err = one_line_error(capsys, ["export", str(base), str(tmp_path / "out"), "--merge"])
    assert "not a LoRA run" in err and not (tmp_path / "out").exists()


def test_resume_with_another_rank(gpt_run, tmp_path, capsys):
    base, corpus, ckpt, _ = gpt_run
    argv = lora_fit_args(base, corpus, tmp_path / "runs", tmp_path / "cache", 12, "--ckpt_path", str(ckpt))
    argv[argv.index("--model.lora.r") + 1] = "8"
    err = one_line_error(capsys, argv)
    assert "--model.lora r=8, alpha=16, targets=default (checkpoint: r=4, alpha=8, targets=default)" in err


def test_adapter_for_another_base(hf_run, tiny_llama_dir, tmp_path, capsys):
    base, _, ckpt, text = hf_run
    # A checkpoint: its base's fingerprint differs.
    err = one_line_error(capsys, ["eval", str(tiny_llama_dir), str(text), "--adapter", str(ckpt)])
    assert "was trained on another base model" in err and str(base) in err
    # An exported folder: the same, from adapter_base.json.
    adapter = tmp_path / "adapter"
    assert main(["export", str(ckpt), str(adapter)]) == 0
    err = one_line_error(capsys, ["eval", str(tiny_llama_dir), str(text), "--adapter", str(adapter)])
    assert "was trained on another base model" in err
    # A PEFT folder from elsewhere (no fingerprint) that does not fit: named by its shapes or modules.
    (adapter / "adapter_base.json").unlink()
    err = one_line_error(capsys, ["eval", str(tiny_llama_dir), str(text), "--adapter", str(adapter)])
    assert "match no module" in err
    # Resuming a LoRA run on a base whose weights changed.
    changed = tmp_path / "changed-base"
    changed.mkdir()
    for f in base.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    network, _ = load_hf_causal_lm(changed)
    with torch.no_grad():
        network.model.transformer.h[0].mlp.c_fc.weight.add_(1e-3)
    network.model.save_pretrained(changed)
    err = one_line_error(capsys, ["eval", str(changed), str(text), "--adapter", str(ckpt)])
    assert "was trained on another base model" in err
    # And no adapter where the flag points.
    err = one_line_error(capsys, ["eval", str(base), str(text), "--adapter", str(tmp_path / "nope")])
    assert "--adapter" in err and "not found" in err


def test_adapter_with_other_shapes_for_the_same_module_names(hf_run, tmp_path, capsys):
    """A PEFT folder (no fingerprint) whose modules exist in the base, with other shapes (another width)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nexttoken.models.hf import HFCausalLM
    from nexttoken.models.lora import save_adapter_folder

    base, _, _, text = hf_run
    vocab = load_hf_causal_lm(base)[0].config.vocab_size
    wider = HFCausalLM(
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=2))
    )
    attach_lora(wider, LoraSettings(r=4, alpha=8))
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter_folder(wider, folder, base="elsewhere", fingerprint="0" * 64)
    (folder / "adapter_base.json").unlink()
    err = one_line_error(capsys, ["eval", str(base), str(text), "--adapter", str(folder)])
    assert "does not fit this base model" in err and "size mismatch" in err


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_fit_eval_export_peft_merge_chain(smollm2_gguf, shared_data, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:4000])
    argv = lora_fit_args(
        smollm2_gguf, corpus, tmp_path / "runs", tmp_path / "cache", 2, "--trainer.limit_val_batches", "1"
    )
    argv[argv.index("--model.lr") + 1] = "1e-3"
    assert main(argv) == 0
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[5000:6000])
    with_adapter = eval_json(capsys, smollm2_gguf, text, "--adapter", ckpt)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["export", str(ckpt), str(adapter)]) == 0
    assert main(["export", str(ckpt), str(merged), "--merge"]) == 0
    from_merged = eval_json(capsys, merged, text)
    assert from_merged["tokens"] == with_adapter["tokens"]
    assert from_merged["perplexity"] == pytest.approx(with_adapter["perplexity"], rel=1e-6)
    assert from_merged["perplexity"] != pytest.approx(
        eval_json(capsys, smollm2_gguf, text)["perplexity"], rel=1e-4
    )
    from nexttoken.models.load import load_checkpoint

    module = load_checkpoint(ckpt)
    x = torch.tensor([module.tokenizer.encode(text.read_text())[:64]])
    base = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        ours = module.network(x)
        torch.testing.assert_close(peft_model(x).logits, ours, rtol=1e-5, atol=1e-5)
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(x).logits
        exact = module.network.double()(x)  # the adapted model evaluated in float64
    # Thirty fp32 layers put the adapted model itself ~1e-4 from its float64 evaluation (logits up to ~35):
    # the merged model must be as close to it as the unmerged one is (the tiny models above meet 1e-5).
    fp32_noise = (ours.double() - exact).abs().max()
    assert (merged_logits.double() - exact).abs().max() <= 2 * fp32_noise
    assert (merged_logits - ours).abs().max() < 5e-4


def test_lora_settings_are_one_object_from_the_command_line_to_the_checkpoint(tmp_path):
    """Parsed the way the command line parses them, kept as plain values a safe load accepts, and
    read back the same; the hyperparameters of older checkpoints (lora_r ...) read as the same."""
    from nexttoken.models.lora import LoraSettings

    settings = LoraSettings(r=8, targets=["q_proj", "v_proj"]).check()
    assert settings.alpha == 16.0 and settings.scale == 2.0 and settings.weight_decay == 0.01
    path = tmp_path / "hp.pt"
    torch.save({"lora": settings.to_dict()}, path)
    assert LoraSettings.of(torch.load(path, weights_only=True)["lora"]) == settings
    old = {"lora_r": 8, "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": ["q_proj", "v_proj"]}
    assert LoraSettings.from_hyperparameters(old) == settings
    assert LoraSettings.from_hyperparameters({"lora": None, "lora_r": None}) is None
    for bad, message in [
        ({"r": 0}, "^r must be a positive rank"),
        ({"r": 4, "dropout": 1.0}, "^dropout must be in"),
    ]:
        with pytest.raises(UserError, match=message):
            LoraSettings.of(bad)


def test_eval_on_chat_records_applies_the_adapter(hf_run, tmp_path, capsys):
    """Chat records are scored by the adapted model too (the adapter was once ignored there)."""
    base, _, ckpt, _ = hf_run
    chats = tmp_path / "chats.jsonl"
    record = {"prompt": "The queen of the river", "response": " was the light of the castle."}
    chats.write_text(json.dumps(record) + "\n")
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    flags = ("--chat-template", template)
    plain = eval_json(capsys, base, chats, *flags)
    adapted = eval_json(capsys, base, chats, "--adapter", ckpt, *flags)
    alone = eval_json(capsys, ckpt, chats, *flags)  # the checkpoint finds its base by the path it recorded
    assert adapted["response_tokens"] == plain["response_tokens"] > 0
    assert abs(adapted["nll_sum"] - plain["nll_sum"]) > 1e-3
    assert adapted["nll_sum"] == pytest.approx(alone["nll_sum"], rel=1e-9)
