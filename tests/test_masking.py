"""Document masking helpers: positions restart and attention stops at every document."""

import torch

from nexttoken.models.masking import document_causal_mask, document_positions, document_starts


def test_positions_restart_at_every_change_of_id():
    ids = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0], [7, 7, 7, 7, 7, 7, 7, 7], [1, 2, 1, 2, 3, 3, 3, 1]])
    assert document_positions(ids).tolist() == [
        [0, 1, 2, 0, 1, 0, 1, 2],
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 0, 0, 0, 0, 1, 2, 0],  # a reused id after another is a new document
    ]
    assert document_starts(ids)[0].tolist() == [True, False, False, True, False, True, False, False]


def test_mask_is_causal_and_block_diagonal():
    ids = torch.tensor([[1, 1, 2, 2, 2, 1]])
    mask = document_causal_mask(ids)
    assert mask.shape == (1, 1, 6, 6)
    # By hand: i sees j iff j <= i and both lie in the same run.
    runs = [0, 0, 1, 1, 1, 2]
    expected = [[j <= i and runs[i] == runs[j] for j in range(6)] for i in range(6)]
    assert mask[0, 0].tolist() == expected
    # One document is plain causal attention.
    one = document_causal_mask(torch.zeros(1, 5, dtype=torch.long))[0, 0]
    assert torch.equal(one, torch.ones(5, 5, dtype=torch.bool).tril())
