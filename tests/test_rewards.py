"""Specs for posttrain.rewards: exact values worked out by hand in the comments."""

import pytest
import torch

from posttrain.rewards import overlong_penalty


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def test_overlong_penalty_by_hand():
    # max_len 10, buffer 4: no penalty up to 10 − 4 = 6; ramp (6 − L)/4 on 7..10; −1 beyond 10.
    # L = 3 → 0;  6 → 0;  7 → −1/4;  10 → −4/4 = −1;  11 → −1.
    lengths = torch.tensor([3, 6, 7, 10, 11])
    penalty = overlong_penalty(lengths, max_len=10, buffer=4)
    assert penalty.is_floating_point()
    close(penalty, [0.0, 0.0, -0.25, -1.0, -1.0])
    close(overlong_penalty(lengths, 10, 4, factor=0.5), [0.0, 0.0, -0.125, -0.5, -0.5])
    close(overlong_penalty(lengths.double(), 10, 4), [0.0, 0.0, -0.25, -1.0, -1.0])


def test_overlong_penalty_edges_of_buffer():
    # buffer = max_len: the ramp starts at 0 → L = 5 gives −5/10;  buffer = 1: only L = max_len pays.
    close(overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), [0.0, -0.5, -1.0])
    close(overlong_penalty(torch.tensor([9, 10, 11]), 10, 1), [0.0, -1.0, -1.0])


@pytest.mark.parametrize("buffer", [0, -1, 11])
def test_overlong_penalty_bad_buffer(buffer):
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([5]), max_len=10, buffer=buffer)
