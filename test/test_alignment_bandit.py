"""The seeds' convergence bounds on the tabular bandit, driven by the trainer's own loss functions."""
import json
import subprocess
import sys

import pytest
import torch

from rko_ros.alignment import bandit, losses


@pytest.fixture(scope='module')
def result():
    torch.set_num_threads(1)
    return bandit.theory(K=8, beta=1.0, seed=0)


def test_dpo_uniform_is_linear_within_0588_power_t(result):
    s = result['settings']['dpo_uniform']
    d = s['max_abs_delta']
    assert len(d) >= 8  # enough iterations to see the rate, not just the first step
    for t, v in enumerate(d):
        assert v <= 0.588 ** t + 1e-12
    # linear: the later ratios settle to a constant well above the quadratic regime
    tail = [r for r in s['ratios'][2:] if r is not None]
    assert 0.01 < min(tail) and max(tail) < 0.588


def test_dpo_mixed_is_quadratic_within_bound(result):
    s = result['settings']['dpo_mixed']
    d = s['max_abs_delta']
    for t, v in enumerate(d):
        assert v <= max(0.611 ** (2 ** t - 1), 1e-12)
    # quadratic: each ratio far smaller than the one before (after the first step)
    r = s['ratios']
    assert r[2] < 0.01 * r[0] and d[3] < 1e-8
    # faster than the uniform sampler from the same start
    assert d[3] < result['settings']['dpo_uniform']['max_abs_delta'][3] * 1e-3


@pytest.mark.parametrize('name', ['kto_uniform', 'rko_uniform'])
def test_kto_and_rko_contract_linearly_to_the_same_fixed_point(result, name):
    s = result['settings'][name]
    e = s['max_abs_error']
    assert e[0] > 0.1 and s['final'] < 1e-6  # the error rbar - x goes to 0: same fixed point
    assert all(r < 1.0 for r in s['ratios'] if r is not None)


def test_noise_leaves_a_neighbourhood_growing_with_sigma(result):
    n = result['settings']['noisy_dpo_uniform']['neighbourhood_by_sigma']
    floors = [n[k] for k in ('0.0', '0.01', '0.03', '0.1')]
    assert floors[0] < 1e-12
    assert floors[1] < floors[2] < floors[3] < 0.2
    assert floors[1] > 1e-4  # the noise really stops convergence


def test_exact_gradient_matches_hand_derivative():
    # For one pair: d/dtheta E[dpo] = coef * beta * (sigmoid(x) - p) * (e_y - e_y')
    r = torch.tensor([0.9, 0.2], dtype=torch.float64)
    theta_ref = torch.zeros(2, dtype=torch.float64)
    theta = torch.tensor([0.3, -0.1], dtype=torch.float64, requires_grad=True)
    coef = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    loss = bandit._dpo_expected_loss(theta, theta_ref, r, 2.0, coef)
    grad, = torch.autograd.grad(loss, theta)
    x = 2.0 * 0.4
    want = (torch.sigmoid(torch.tensor(x, dtype=torch.float64))
            - torch.sigmoid(torch.tensor(0.7, dtype=torch.float64))) * 2.0
    assert grad[0].item() == pytest.approx(float(want), rel=1e-9)
    assert grad[1].item() == pytest.approx(-float(want), rel=1e-9)


def test_kto_reference_point_override_is_detached_and_used():
    g = torch.tensor([-0.5, -0.1, 0.2], requires_grad=True)
    q = torch.tensor([1.0, -1.0, 1.0])
    _, m_default = losses.kto_loss(g, q, beta=1.0)
    assert m_default['z0'] == 0.0  # the batch estimate is clamped at 0
    loss, m = losses.kto_loss(g, q, beta=1.0, reference_point=g.mean())
    assert m['z0'] == pytest.approx(-0.4 / 3, rel=1e-6)
    loss.backward()  # z0 carries no gradient: each sample's gradient is its own term only
    x = q * (g.detach() - (-0.4 / 3))
    want = -q * torch.sigmoid(x) * (1 - torch.sigmoid(x)) / 3
    assert torch.allclose(g.grad, want, atol=1e-6)


def test_cli_prints_one_json_line():
    out = subprocess.run([sys.executable, '-m', 'rko_ros.cli', 'bench', 'theory', '--json',
                          '--arms', '5'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d['all_hold'] is True and d['K'] == 5
