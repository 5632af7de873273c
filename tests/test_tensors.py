"""The one left-padding helper and the one position-id helper (hapo_cli/tensors.py), on
hand-written rows."""

import torch

from hapo_cli.tensors import left_pad, left_pad_prompts, position_ids


def test_left_pad_prompts_right_aligns_and_masks():
    ids, mask = left_pad_prompts([[5, 6, 7], [8], torch.tensor([9, 10])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_pad_keeps_dtype_values_and_width():
    # re-padding an already padded (B, 2) mask to width 4 keeps its zeros (concat_batches)
    rows = list(torch.tensor([[0, 1], [1, 1]], dtype=torch.int32))
    out = left_pad(rows, 0, width=4)
    assert out.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]] and out.dtype == torch.int32


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    # left pads get 0 and the first real token 0; a right pad repeats the last position (it is
    # masked out of attention and of the loss)
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 0, 0, 0, 0]]
    assert position_ids(mask.bool()).dtype == torch.long
