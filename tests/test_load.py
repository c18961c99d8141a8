import pytest
import torch

from nexttoken.data.datamodule import TextDataModule
from nexttoken.errors import UserError
from nexttoken.models.gpt import GPT
from nexttoken.models.hf import HFCausalLM
from nexttoken.models.load import is_hf_model, load_checkpoint, load_model, resolve_device, resolve_eval_dtype
from nexttoken.training.module import CausalLMModule
from test_datamodule import write_corpus
from test_module import quiet_trainer

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real nexttoken checkpoint (one optimizer step of a tiny GPT on bytes) and its module."""
    folder = tmp_path_factory.mktemp("load")
    data = TextDataModule(
        path=[str(write_corpus(folder / "corpus"))],
        tokenizer="bytes",
        block_size=8,
        batch_size=2,
        cache_dir=str(folder / "cache"),
    )
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", block_size=8, n_layer=1, n_head=2, n_embd=16)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt", module.eval()


def test_is_hf_model_tells_presets_from_model_paths(tmp_path):
    assert not is_hf_model("tiny") and not is_hf_model("gpt2")
    assert is_hf_model("somewhere/model.gguf")  # by its name: a missing file is reported when loading
    assert is_hf_model(str(tmp_path))
    assert not is_hf_model(str(tmp_path / "absent-folder"))
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert not is_hf_model(str(tmp_path / "last.ckpt"))


def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'abacus'; use auto, cpu or cuda"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available here; use device cpu"):
            resolve_device("cuda:1")


def test_resolve_eval_dtype():
    cpu = torch.device("cpu")
    assert resolve_eval_dtype("auto", cpu) == torch.float32  # exact on a CPU
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert resolve_eval_dtype(name, cpu) == dtype
    with pytest.raises(UserError, match="unknown dtype 'float64'"):
        resolve_eval_dtype("float64", cpu)


def test_a_checkpoint_loads_as_the_trained_model_and_tokenizer(trained):
    path, module = trained
    x = torch.tensor([list(TEXT.encode())[:8]])
    model, tokenizer = load_model(str(path))
    assert isinstance(model, GPT) and not model.training
    assert tokenizer.fingerprint == module.tokenizer.fingerprint and tokenizer.kind == "bytes"
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(model(x), module.model(x), rtol=0, atol=0)
        assert next(model.parameters()).dtype == torch.float32
        half, _ = load_model(str(path), dtype="bfloat16", device="cpu")
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(half(x).float(), module.model(x), rtol=0.05, atol=0.05)
    again = load_checkpoint(path)
    assert isinstance(again.network, GPT) and not again.network.training and again.lora is None
    assert again.settings["n_embd"] == 16 and again.settings["vocab_size"] == 259
    # Lightning's own way of reading the checkpoint (through the module that wrote it) agrees.
    lightning = CausalLMModule.load_from_checkpoint(path, weights_only=True)
    for name, tensor in lightning.model.state_dict().items():
        assert torch.equal(again.network.state_dict()[name], tensor), name


def test_a_hugging_face_folder_loads_as_transformers_would(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_model(str(tiny_gpt2_dir), device="cpu")
    assert isinstance(model, HFCausalLM) and not model.training
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, local_files_only=True).eval()
    ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir).encode(TEXT, add_special_tokens=False)
    assert tokenizer.encode(TEXT) == ids
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])), reference(torch.tensor([ids])).logits)


def test_bad_model_paths_are_one_clear_line(tmp_path, trained):
    cases = {
        tmp_path / "absent.ckpt": "MODEL not found: .*absent.ckpt; pass a nexttoken checkpoint",
        tmp_path / "notes.txt": "neither a Hugging Face model folder nor a .gguf file",
        tmp_path / "fake.gguf": "is not a GGUF file",
        tmp_path / "empty-folder": "missing config.json, weights .*, tokenizer",
        tmp_path / "broken.ckpt": "is truncated or corrupted",
    }
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.gguf").write_bytes(b"not gguf at all")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "broken.ckpt").write_bytes(trained[0].read_bytes()[:1000])
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            load_model(str(path))
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="unknown device"):
        load_model(str(trained[0]), device="abacus")
