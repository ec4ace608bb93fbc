"""Hypothesis 1's statistics (ka_hf.study.evaluation.distributions) against independent computations: linear CKA
by its Gram-matrix (HSIC) form, and a real model's layer-0 A and V rebuilt from a standard forward's weights by
the KA recursion written out token by token."""

import math

import pytest
import torch

from ka_hf.adapters import KAAdapter
from ka_hf.study.capture import capture_attention
from ka_hf.study.evaluation.distributions import av_statistics, linear_cka, pair_statistics

from conftest import tiny_model


def hsic_cka(x, y) -> float:
    """CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T (samples space)."""
    n = x.shape[0]
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram_x, gram_y = centre @ (x @ x.T) @ centre, centre @ (y @ y.T) @ centre
    return float((gram_x * gram_y).sum() / math.sqrt(float((gram_x * gram_x).sum() * (gram_y * gram_y).sum())))


def test_linear_cka_equals_its_gram_form_and_ignores_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    y = x @ torch.randn(6, 6, dtype=torch.float64) + 0.5 * torch.randn(50, 6, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0, rel=1e-10)
    assert linear_cka(x, torch.randn(50, 6, dtype=torch.float64)) < 0.5


def test_pair_statistics_by_hand():
    values = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 1.0]]])  # (tokens, heads, dim)
    outputs = torch.tensor([[[2.0, 0.0]], [[0.0, -2.0]], [[1.0, 1.0]]])
    result = pair_statistics(outputs, values)
    assert result["norm_ratio"] == pytest.approx((2 + 1 + 1) / 3)
    assert result["cosine"] == pytest.approx((1 - 1 + 1) / 3)
    assert pair_statistics(values, values) == pytest.approx(dict(norm_ratio=1.0, cosine=1.0, cka=1.0))


def independent_layer0(model, windows, scale: float = 1.0):
    """Layer 0's (f(A), V) rows over the windows' real tokens: V and the weights W from a standard forward (layer
    0's input does not depend on attention), A by a_i = sum_{j<i} w_ij f(a_j) + w_ii v_i, token by token in
    float64, with f(a) = scale * a (1: no adapter)."""
    outputs, values = [], []
    for window in windows:
        ids = window["input_ids"][None]
        captured = capture_attention(model, ids)[0]
        weights, v = captured.weights[0].double(), captured.values[0].double()  # (H, T, T), (H, T, d)
        a = torch.zeros_like(v)
        for i in range(v.shape[1]):
            past = scale * a[:, :i]
            a[:, i] = weights[:, i, i, None] * v[:, i] + torch.einsum("hj,hjd->hd", weights[:, i, :i], past)
        outputs.append(scale * a.transpose(0, 1))
        values.append(v.transpose(0, 1))
    return torch.cat(outputs), torch.cat(values)


def expected_statistics(outputs, values) -> dict:
    return dict(
        norm_ratio=float((outputs.norm(dim=-1) / values.norm(dim=-1)).mean()),
        cosine=float(torch.nn.functional.cosine_similarity(outputs, values, dim=-1).mean()),
        cka=hsic_cka(outputs.flatten(1), values.flatten(1)),
    )


@pytest.mark.parametrize("name", ["gpt2", "gpt-neox"])
def test_layer0_statistics_equal_an_independent_computation(name):
    model = tiny_model(name, dtype=torch.float64, num_layers=2)
    torch.manual_seed(1)
    lengths = (9, 6, 9)  # a shorter window in a batch: padding, left out of the statistics
    windows = [dict(input_ids=torch.randint(3, 90, (n,)), labels=torch.randint(3, 90, (n,))) for n in lengths]
    statistics = av_statistics(model, windows)["ka"]
    assert [layer["layer"] for layer in statistics] == [0, 1]
    expected = expected_statistics(*independent_layer0(model, windows))
    assert {k: statistics[0][k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert statistics[0]["cosine"] < 0.999  # A is not V: the comparison can see a difference


def test_an_adapter_is_compared_through_its_map():
    """f(A) against V in the adapter's own forward (later tokens attend over f(A)): f(a) = 2a, rebuilt by hand."""
    model = tiny_model("gpt2", dtype=torch.float64, num_layers=2)
    torch.manual_seed(2)
    windows = [dict(input_ids=torch.randint(3, 90, (8,)), labels=torch.randint(3, 90, (8,))) for _ in range(2)]
    identity = KAAdapter.for_model(model).double()
    doubled = KAAdapter.for_model(model).double()
    with torch.no_grad():
        for parameter in doubled.parameters():
            if parameter.dim() >= 2:  # M = 2I, b = 0
                parameter.mul_(2.0)
    result = av_statistics(model, windows, {"identity": identity, "doubled": doubled})
    assert result["ka+adapter(identity)"] == pytest.approx(result["ka"], rel=1e-9)
    expected = expected_statistics(*independent_layer0(model, windows, scale=2.0))
    assert {k: result["ka+adapter(doubled)"][0][k] for k in expected} == pytest.approx(expected, rel=1e-6)
