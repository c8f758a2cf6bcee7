"""DHN-NCE (``engines.medclipsam.dhn_nce``) against a direct per-element computation of the paper's formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from CLIPSegLib.engines.medclipsam.dhn_nce import dhn_nce_loss
from CLIPSegLib.errors import InputError


def reference(v, t, tau, beta1, beta2):
    """The formula written out element by element in float64 Python arithmetic (slow, obvious)."""
    v = F.normalize(v.double(), dim=-1).tolist()
    t = F.normalize(t.double(), dim=-1).tolist()
    b = len(v)

    def dot(a, c):
        return sum(x * y for x, y in zip(a, c))

    def direction(anchor, other, beta):
        total = 0.0
        for i in range(b):
            s = [dot(anchor[i], other[j]) / tau for j in range(b)]
            z = sum(math.exp(beta * s[k]) for k in range(b) if k != i)
            denominator = 0.0
            for j in range(b):
                if j != i:
                    w = (b - 1) * math.exp(beta * s[j]) / z
                    denominator += w * math.exp(s[j])
            total += -math.log(math.exp(s[i]) / denominator)
        return total / b

    return direction(v, t, beta1) + direction(t, v, beta2)


@pytest.mark.parametrize("b,d,tau,beta1,beta2", [(2, 3, 0.6, 0.15, 0.15), (5, 8, 0.6, 0.15, 0.4),
                                                  (7, 4, 0.1, 1.0, 0.0), (4, 16, 2.0, 3.0, 2.5)])
def test_matches_the_direct_per_element_formula(b, d, tau, beta1, beta2):
    g = torch.Generator().manual_seed(b * 100 + d)
    v, t = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    got = dhn_nce_loss(v, t, temperature=tau, beta1=beta1, beta2=beta2)
    assert got.ndim == 0
    assert got.item() == pytest.approx(reference(v, t, tau, beta1, beta2), rel=1e-5, abs=1e-6)


def test_beta_zero_is_decoupled_infonce():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    tau = 0.5
    s = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T / tau
    off = ~torch.eye(6, dtype=torch.bool)

    def decoupled(m):  # -log exp(s_ii) / sum_{j != i} exp(s_ij), no weights
        return (torch.logsumexp(m.masked_fill(~off, float("-inf")), dim=1) - m.diagonal()).mean()

    expected = decoupled(s) + decoupled(s.T)
    assert dhn_nce_loss(v, t, temperature=tau, beta1=0.0, beta2=0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # hardness weighting changes the loss (the test above is not passing for a loss that ignores beta)
    assert dhn_nce_loss(v, t, temperature=tau, beta1=2.0, beta2=0.0).item() != pytest.approx(expected.item(), rel=1e-3)


def test_gradients_are_finite_and_training_pulls_pairs_together():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(6, 8, generator=g, requires_grad=True)
    t = torch.randn(6, 8, generator=g, requires_grad=True)
    opt = torch.optim.SGD([v, t], lr=0.5)
    first = None
    for _ in range(30):
        loss = dhn_nce_loss(v, t)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()
        opt.step()
    assert loss.item() < first - 0.5
    sim = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    assert (sim.argmax(dim=1) == torch.arange(6)).all()


@pytest.mark.parametrize("shapes,kw,match", [(((1, 4), (1, 4)), {}, "at least 2"),
                                             (((3, 4), (3, 5)), {}, "same shape"),
                                             (((3, 4), (3, 4)), {"temperature": 0.0}, "temperature")])
def test_bad_input_is_named(shapes, kw, match):
    with pytest.raises(InputError, match=match):
        dhn_nce_loss(torch.randn(*shapes[0]), torch.randn(*shapes[1]), **kw)
