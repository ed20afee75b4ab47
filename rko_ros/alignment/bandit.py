"""The seeds' convergence theory, reproduced on a tabular softmax bandit (DESIGN.md section 6).

K arms, rewards r ~ U[0, 1], policy pi = softmax(theta), theta_0 = theta_ref. The gradients come from
the SAME loss functions the trainer uses (`losses.dpo_loss`, `losses.kto_loss`, `losses.rko_loss`)
through autograd on the logits; "exact" means the loss is the expectation over the sampler and over
the Bernoulli labels, written as a weighted sum of those functions' values (sampler probabilities
and label probabilities are data, detached). The implied log-ratio of an arm is
g(y) = log pi(y) - log pi_ref(y), so beta * (g(y) - g(y')) is the design's x(y, y').

Settings (choices the design leaves open are marked [choice]):
- dpo_uniform: ordered pairs (y, y') with probability 1/K^2 each, i.e. 2/K^2 per unordered pair;
  step theta -= eta * alpha * grad with alpha = 2K^2, eta = 1/(beta^2 K). Bound 0.588^T.
- dpo_mixed: half uniform (alpha_1 = K^2) plus the policy-difference sampler
  pi_s(y, y') = exp(x(y, y')) / alpha_2 (y ~ (pi/pi_ref)^beta, y' ~ (pi_ref/pi)^beta),
  alpha_2 = sum exp(x); per unordered pair the coefficient is 2 + e^x + e^-x = 1/sigmoid'(x), so the
  step is Newton-like and max|delta| falls quadratically. Bound 0.611^(2^T - 1).
- kto_uniform: every arm once (uniform sampler), desirable with probability sigmoid(rbar(a)),
  utility log_sigmoid, reference point = the exact mean of g over arms (not clamped at 0, see
  `losses.kto_loss(reference_point=)`). [choice] step theta -= eta * grad with eta = 4K/beta^2
  (4 = 1/sigmoid'(0), K undoes the 1/K of the mean over arms), the KTO analogue of DPO's alpha*eta.
  Error e(a) = rbar(a) - x(a), x centred.
- rko_uniform: the same with stop-gradient weights w(a) ~ U[w_min, w_max] = U[1, 2] (the range of an
  RKO winner weight 1 + max_j W), redrawn every iteration [choice]; same step. Same fixed point.
- noisy: dpo_uniform with N(0, sigma^2) noise added to the gradient; the error stops in a
  neighbourhood of 0 that grows with sigma (reported per sigma as the median of the last iterations).
Bounds start from max|delta_0| <= 1 (r in [0, 1]). Numbers stop at 1e-12 (float64 round-off).
Imports torch and the alignment losses only.
"""
import json

import torch

from rko_ros.alignment import losses

FLOOR = 1e-12
DPO_LINEAR_RATE = 0.588
DPO_QUADRATIC_BASE = 0.611


def _problem(K, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(K, generator=gen, dtype=torch.float64)
    theta_ref = torch.randn(K, generator=gen, dtype=torch.float64)
    return r, theta_ref, gen


def _g(theta, theta_ref):
    return torch.log_softmax(theta, 0) - torch.log_softmax(theta_ref, 0)


def _pair_delta(theta, theta_ref, r, beta):
    g = _g(theta, theta_ref).detach()
    x = beta * (g.view(-1, 1) - g.view(1, -1))
    return (r.view(-1, 1) - r.view(1, -1)) - x


def _dpo_expected_loss(theta, theta_ref, r, beta, coef):
    """sum over ordered pairs coef(y,y') E_labels[dpo_loss]; coef = alpha * pi_s, detached."""
    g = _g(theta, theta_ref)
    K = len(r)
    total = theta.new_zeros(())
    for y in range(K):
        for yp in range(K):
            if y == yp:
                continue
            p = torch.sigmoid(r[y] - r[yp])  # Bradley-Terry: y preferred to y'
            win, _ = losses.dpo_loss(g[y:y + 1], g[yp:yp + 1], beta)
            lose, _ = losses.dpo_loss(g[yp:yp + 1], g[y:y + 1], beta)
            total = total + coef[y, yp] * (p * win + (1 - p) * lose)
    return total


def _dpo_coef(theta, theta_ref, beta, sampler):
    K = len(theta)
    uniform = torch.full((K, K), 1.0 / K ** 2, dtype=theta.dtype)
    if sampler == 'uniform':
        return 2 * K ** 2 * uniform  # alpha = 2K^2
    g = _g(theta, theta_ref).detach()
    ex = torch.exp(beta * (g.view(-1, 1) - g.view(1, -1)))
    alpha_2 = ex.sum()
    return K ** 2 * uniform + alpha_2 * (ex / alpha_2)  # alpha_1 pi_u + alpha_2 pi_s


def run_dpo(K=8, beta=1.0, iterations=6, sampler='uniform', seed=0, noise_std=0.0):
    r, theta_ref, gen = _problem(K, seed)
    theta = theta_ref.clone()
    eta = 1.0 / (beta ** 2 * K)
    deltas = [float(_pair_delta(theta, theta_ref, r, beta).abs().max())]
    for _ in range(iterations):
        theta = theta.detach().requires_grad_(True)
        coef = _dpo_coef(theta, theta_ref, beta, sampler)
        loss = _dpo_expected_loss(theta, theta_ref, r, beta, coef)
        grad, = torch.autograd.grad(loss, theta)
        if noise_std:
            grad = grad + noise_std * torch.randn(K, generator=gen, dtype=grad.dtype)
        theta = (theta - eta * grad).detach()
        deltas.append(float(_pair_delta(theta, theta_ref, r, beta).abs().max()))
    return deltas


def _kto_error(theta, theta_ref, r, beta):
    g = _g(theta, theta_ref).detach()
    x = beta * (g - g.mean())
    return (r - r.mean()) - x


def run_kto(K=8, beta=1.0, iterations=12, seed=0, weighted=False, w_range=(1.0, 2.0)):
    r, theta_ref, gen = _problem(K, seed)
    rbar = r - r.mean()
    p = torch.sigmoid(rbar)
    q = torch.cat([torch.ones(K), -torch.ones(K)]).to(torch.float64)
    theta = theta_ref.clone()
    eta = 4.0 * K / beta ** 2
    errors = [float(_kto_error(theta, theta_ref, r, beta).abs().max())]
    for _ in range(iterations):
        theta = theta.detach().requires_grad_(True)
        g = _g(theta, theta_ref)
        g2 = torch.cat([g, g])
        # Bernoulli labels in expectation: each arm once as desirable (weight p) and once as
        # undesirable (weight 1 - p); the weighted mean of kto_loss is then exactly
        # (1/K) sum_a E_q[loss(a, q)] (the weights sum to K).
        label_w = torch.cat([p, 1 - p])
        if weighted:
            w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(K, generator=gen, dtype=torch.float64)
            loss, _ = losses.rko_loss(g2, q, torch.cat([w, w]) * label_w, beta=beta,
                                      utility='log_sigmoid', reference_point=g.mean())
            loss = loss * (w.mean())  # rko normalises by sum(s) = K mean(w): keep the KTO scale
        else:
            loss, _ = losses.kto_loss(g2, q, beta=beta, utility='log_sigmoid', weights=label_w,
                                      reference_point=g.mean())
        grad, = torch.autograd.grad(loss, theta)
        theta = (theta - eta * grad).detach()
        errors.append(float(_kto_error(theta, theta_ref, r, beta).abs().max()))
    return errors


def _ratios(seq):
    return [b / a if a > FLOOR else None for a, b in zip(seq, seq[1:])]


def _trim(seq):
    """Drop the iterations after the error reached float64 round-off."""
    out = []
    for v in seq:
        out.append(v)
        if v <= FLOOR:
            break
    return out


def theory(K=8, beta=1.0, seed=0):
    """Every setting of the module docstring; returns a JSON-ready dict."""
    out = {'bench': 'theory', 'K': K, 'beta': beta, 'seed': seed, 'settings': {}}
    s = out['settings']

    d = _trim(run_dpo(K, beta, 12, 'uniform', seed))
    bound = [DPO_LINEAR_RATE ** t for t in range(len(d))]
    s['dpo_uniform'] = {'rate': 'linear', 'max_abs_delta': d, 'ratios': _ratios(d), 'bound': bound,
                        'holds': all(v <= b + FLOOR for v, b in zip(d, bound))}

    d = _trim(run_dpo(K, beta, 6, 'mixed', seed))
    bound = [DPO_QUADRATIC_BASE ** (2 ** t - 1) for t in range(len(d))]
    s['dpo_mixed'] = {'rate': 'quadratic', 'max_abs_delta': d, 'ratios': _ratios(d), 'bound': bound,
                      'holds': all(v <= max(b, FLOOR) for v, b in zip(d, bound))}

    for name, weighted in (('kto_uniform', False), ('rko_uniform', True)):
        e = _trim(run_kto(K, beta, 25, seed, weighted=weighted))
        ratios = _ratios(e)
        worst = max(x for x in ratios if x is not None)
        s[name] = {'rate': 'linear', 'max_abs_error': e, 'ratios': ratios, 'worst_ratio': worst,
                   'final': e[-1], 'holds': worst < 1.0 and e[-1] < 1e-6}

    noisy = {}
    for sigma in (0.0, 0.01, 0.03, 0.1):
        d = run_dpo(K, beta, 30, 'uniform', seed, noise_std=sigma)
        tail = sorted(d[-10:])
        noisy[str(sigma)] = tail[len(tail) // 2]
    floors = list(noisy.values())
    s['noisy_dpo_uniform'] = {'neighbourhood_by_sigma': noisy,
                              'holds': all(a <= b for a, b in zip(floors, floors[1:]))
                              and floors[-1] < 1.0}
    out['all_hold'] = all(v['holds'] for v in s.values())
    return out


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        'theory', help="check the seeds' convergence bounds on a tabular bandit",
        description='Runs DPO (uniform and mixed policy-difference samplers), KTO and RKO (log-ratio '
                    'form, uniform sampler) and noisy DPO on a K-armed softmax bandit with the same '
                    'loss functions as the trainer, and prints max|delta| per iteration, the '
                    'contraction ratios and whether the bounds (0.588^T; 0.611^(2^T-1)) hold.')
    p.add_argument('--arms', type=int, default=8, help='K (default 8)')
    p.add_argument('--beta', type=float, default=1.0, help='beta (default 1)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.set_defaults(func=_bench_theory)


def _bench_theory(args):
    result = theory(args.arms, args.beta, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for name, v in result['settings'].items():
            seq = v.get('max_abs_delta') or v.get('max_abs_error') or v.get('neighbourhood_by_sigma')
            print(f"{name:>18}: holds={v['holds']} {seq}")
    return 0 if result['all_hold'] else 1


if __name__ == '__main__':  # pragma: no cover
    print(json.dumps(theory()))
