"""RowGroups: rows of a batch laid out per example, and the per-example Gram matrices the linear rule reads."""

import torch

from dp_utils import RowGroups


def explicit_grams(x: torch.Tensor, rows_of_example: list[list[int]]) -> torch.Tensor:
    """Each example's tokens (its rows end to end) and their Gram matrix, one example at a time."""
    grams = []
    for rows in rows_of_example:
        tokens = torch.cat([x[r] for r in rows])
        grams.append(tokens @ tokens.T)
    return grams


def test_gram_of_consecutive_rows_equals_the_explicit_one():
    x = torch.randn(6, 5, 3)
    grams, error = RowGroups(None, 6, multiplicity=2).gram(x)
    assert error == 0  # fp32 operands: exact to fp32
    for gram, expected in zip(grams, explicit_grams(x, [[0, 1], [2, 3], [4, 5]]), strict=True):
        torch.testing.assert_close(gram, expected)


def test_gram_of_unequal_groups_pads_with_zeros():
    x = torch.randn(5, 4, 3)
    groups = RowGroups(torch.tensor([7, 3, 7, 7, 9]), 5)  # examples (sorted ids): 3 -> [1], 7 -> [0, 2, 3], 9 -> [4]
    grams, _ = groups.gram(x)
    assert grams.shape == (3, 12, 12)
    for gram, expected in zip(grams, explicit_grams(x, [[1], [0, 2, 3], [4]]), strict=True):
        n = expected.shape[0]
        torch.testing.assert_close(gram[:n, :n], expected)
        assert not gram[n:].any() and not gram[:, n:].any()


def test_shared_value_is_reused_for_one_tensor_and_never_stale():
    groups = RowGroups(None, 4)
    x = torch.randn(4, 8, 16)
    computed = []

    def gram_of(t):
        computed.append(t)
        return groups.gram(t)[0]

    first = groups.shared(x, "gram", lambda: gram_of(x))
    assert groups.shared(x.reshape(4, -1, 16), "gram", lambda: gram_of(x)) is first  # q, k and v: views of one input
    assert len(computed) == 1
    y = torch.randn(4, 8, 16)  # same shape, other values
    torch.testing.assert_close(groups.shared(y, "gram", lambda: gram_of(y)), y @ y.mT)
    z = x[:, :4]  # same address, other layout
    torch.testing.assert_close(groups.shared(z, "gram", lambda: gram_of(z)), z @ z.mT)
    assert groups.shared(z, "other tag", lambda: None) is None


def test_gram_of_bf16_tokens_has_bf16_operands_and_states_its_rounding():
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16)
    gram, error = RowGroups(None, 4).gram(x)
    assert gram.dtype == torch.float32
    exact = x.double() @ x.double().mT  # the product of the stored bf16 values
    assert error == 2**-8
    assert ((gram.double() - exact).abs() <= error * gram.double().abs() / (1 - error)).all()


def test_expand_and_sum_rows_follow_the_groups():
    groups = RowGroups(torch.tensor([2, 0, 2]), 3)
    assert torch.equal(groups.expand(torch.tensor([10.0, 20.0])), torch.tensor([20.0, 10.0, 20.0]))
    assert torch.equal(groups.sum_rows(torch.tensor([1.0, 2.0, 4.0])), torch.tensor([2.0, 5.0]))
