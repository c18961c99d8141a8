import fsspec
import pytest
import torch

from nexttoken.checkpoints import AtomicCheckpointIO, read_checkpoint
from nexttoken.errors import UserError


def a_checkpoint(value: float = 1.5) -> dict:
    return {"state_dict": {"w": torch.full((3, 2), value)}, "global_step": 7, "tokenizer": {"kind": "bytes"}}


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


class Arbitrary:
    """Any class: safe loading must refuse to rebuild it."""


def test_save_then_read_round_trips(tmp_path):
    path = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(), path)
    loaded = read_checkpoint(path)
    assert loaded["global_step"] == 7 and loaded["tokenizer"] == {"kind": "bytes"}
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.full((3, 2), 1.5))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(a_checkpoint(1.5), path)
    broken = {**a_checkpoint(2.5), "callback": Unpicklable()}  # fails halfway through torch.save
    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint(broken, path)
    torch.testing.assert_close(read_checkpoint(path)["state_dict"]["w"], torch.full((3, 2), 1.5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_remote_paths_keep_lightnings_writer():
    path = "memory://checkpoints/last.ckpt"
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(3.0), path)
    with fsspec.open(path, "rb") as f:
        loaded = torch.load(f, weights_only=True)
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.full((3, 2), 3.0))
    fsspec.filesystem("memory").rm("/checkpoints", recursive=True)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; pass the path of a \.ckpt file"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path)  # a folder is not a checkpoint file


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_is_one_clear_line(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 64, "empty": b""}[damage]
    )
    with pytest.raises(UserError, match="is truncated or corrupted") as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "best-*.ckpt" in message


def test_a_checkpoint_that_wants_to_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Arbitrary()}, path)  # needs unpickling a class
    with pytest.raises(UserError, match="safe loading refuses") as caught:
        read_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_a_torch_file_without_a_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(UserError, match=r"not a Lightning checkpoint \(no state_dict\)"):
        read_checkpoint(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(UserError, match="not a Lightning checkpoint"):
        read_checkpoint(path)
