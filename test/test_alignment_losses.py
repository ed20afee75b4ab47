"""Alignment losses: hand-computed values, gradient directions, rko(s=1) == kto, detached weights."""
import math

import pytest
import torch

from rko_ros.alignment import losses
from rko_ros.alignment.weights import rko_weights, similarity_matrix


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_matches_hand_computation():
    g_w, g_l = torch.tensor([0.02, -0.01]), torch.tensor([0.0, 0.03])
    loss, metrics = losses.dpo_loss(g_w, g_l, beta=10.0)
    expected = -(math.log(sig(10 * 0.02)) + math.log(sig(10 * -0.04))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics['accuracy'] == 0.5


def test_rpo_weights_the_logit_over_all_cross_pairs():
    g_w, g_l = torch.tensor([0.1, 0.0]), torch.tensor([0.05, -0.05])
    W = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    loss, _ = losses.rpo_loss(g_w, g_l, W, beta=20.0)
    expected = -sum(math.log(sig(20 * W[i, j].item() * (g_w[i] - g_l[j]).item()))
                    for i in range(2) for j in range(2)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kto_matches_hand_computation():
    g = torch.tensor([0.05, -0.02, 0.01, 0.04])
    q = torch.tensor([1, 1, -1, -1])
    loss, metrics = losses.kto_loss(g, q, beta=12.0, lambda_d=1.0, lambda_u=2.0)
    z0 = max(0.0, sum(g.tolist()) / 4)
    assert metrics['z0'] == pytest.approx(z0)
    lam = [1.0, 1.0, 2.0, 2.0]
    expected = sum(l * (1 - sig(qb * 12 * (gb - z0))) for l, qb, gb in zip(lam, q.tolist(), g.tolist())) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Reference point is clipped at zero when the policy is, on average, worse than the reference.
    _, metrics = losses.kto_loss(-g.abs(), q)
    assert metrics['z0'] == 0.0
    loss_log, _ = losses.kto_loss(g, q, beta=12.0, utility='log_sigmoid')
    expected_log = -sum(math.log(sig(qb * 12 * (gb - z0))) for qb, gb in zip(q.tolist(), g.tolist())) / 4
    assert loss_log.item() == pytest.approx(expected_log, rel=1e-6)


def test_rko_with_unit_weights_equals_kto_exactly():
    torch.manual_seed(0)
    g = torch.randn(16) * 0.1
    q = torch.tensor([1, -1] * 8)
    for utility in ('sigmoid', 'log_sigmoid'):
        kto, _ = losses.kto_loss(g, q, beta=12.0, utility=utility)
        rko, _ = losses.rko_loss(g, q, torch.ones(16), beta=12.0, utility=utility)
        assert torch.equal(kto, rko)


def test_rko_weighted_average_by_hand():
    g = torch.tensor([0.05, -0.02, 0.01])
    q = torch.tensor([1, 1, -1])
    s = torch.tensor([1.5, 1.2, 2.0])
    loss, _ = losses.rko_loss(g, q, s, beta=12.0)
    z0 = max(0.0, sum(g.tolist()) / 3)
    per = [1 - sig(qb * 12 * (gb - z0)) for qb, gb in zip(q.tolist(), g.tolist())]
    assert loss.item() == pytest.approx(sum(w * l for w, l in zip(s.tolist(), per)) / s.sum().item(), rel=1e-6)


def test_sft_and_fkpd_by_hand():
    loss, _ = losses.sft_loss(torch.tensor([0.2, 0.4]))
    assert loss.item() == pytest.approx(0.3)
    loss, metrics = losses.fkpd_loss(torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([0.5, 0.7]),
                                     beta=10.0, lambda_fkl=2.0)
    assert loss.item() == pytest.approx(-math.log(sig(1.0)) + 2.0 * 0.6, rel=1e-6)
    assert metrics['forward_kl'] == pytest.approx(0.6)


@pytest.mark.parametrize('method', ['kto', 'rko'])
def test_gradients_raise_desirable_and_lower_undesirable_rewards(method):
    # e_theta as leaf: g = e_ref - e_theta, so d loss / d e_theta > 0 means "lower the error" helps.
    e_theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    e_ref = torch.tensor([0.5, 0.5, 0.5, 0.5])
    q = torch.tensor([1, 1, -1, -1])
    g = e_ref - e_theta
    if method == 'kto':
        loss, _ = losses.kto_loss(g, q)
    else:
        loss, _ = losses.rko_loss(g, q, torch.tensor([1.2, 1.8, 0.6, 1.4]))
    loss.backward()
    assert (e_theta.grad[:2] > 0).all()   # gradient descent lowers the error on desirable samples
    assert (e_theta.grad[2:] < 0).all()   # and raises it on undesirable ones


@pytest.mark.parametrize('method', ['dpo', 'rpo', 'fkpd'])
def test_pairwise_gradients_point_the_right_way(method):
    g_w = torch.zeros(3, requires_grad=True)
    g_l = torch.zeros(3, requires_grad=True)
    if method == 'dpo':
        loss, _ = losses.dpo_loss(g_w, g_l)
    elif method == 'rpo':
        loss, _ = losses.rpo_loss(g_w, g_l, torch.full((3, 3), 1 / 3))
    else:
        loss, _ = losses.fkpd_loss(g_w, g_l, torch.zeros(3))
    loss.backward()
    assert (g_w.grad < 0).all() and (g_l.grad > 0).all()


def test_similarity_weights_are_a_row_softmax_and_detached():
    encoder = torch.nn.Linear(4, 8)
    x = torch.randn(6, 4)
    z = encoder(x)
    q = torch.tensor([1, 1, 1, -1, -1, -1])
    W = similarity_matrix(z[:3], z[3:], tau=0.15)
    assert W.shape == (3, 3) and torch.allclose(W.sum(1), torch.ones(3))
    assert not W.requires_grad
    s = rko_weights(z, q, tau=0.15)
    assert not s.requires_grad
    assert torch.allclose(s[:3], 1 + W.max(1).values) and torch.allclose(s[3:], W.sum(0))
    # No gradient flows into the encoder through the weights: the loss's grad with respect to the
    # encoder comes only from g.
    g = torch.zeros(6, requires_grad=True)
    loss, _ = losses.rko_loss(g, q, s)
    loss.backward()
    assert encoder.weight.grad is None
    # Hand check of one entry.
    zn = torch.nn.functional.normalize(z.detach(), dim=-1)
    logits = zn[0] @ zn[3:].T / 0.15
    assert torch.allclose(W[0], torch.softmax(logits, 0), atol=1e-6)
