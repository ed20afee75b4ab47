"""One loss function per alignment method, over implied log-ratios (DESIGN.md section 6).

Every function is pure: it takes per-sample quantities computed by the (method-agnostic) trainer and
returns `(loss, metrics)`. With `e_theta`/`e_ref` the per-sample denoising errors of the policy and
the frozen reference on the same (a_t, t, eps), the implied log-ratio is `g = e_ref - e_theta`
(positive when the policy explains the sample better than the reference) and the implied reward is
`beta * g`. Sources: Diffusion-DPO (Wallace et al.), Diffusion-KTO (Li et al.), RPO (Yin et al.),
FKPD (Shan et al.), RKO (Moletta et al., RA-L 2026; equations from secondary notes).
Imports torch only.
"""
import torch
import torch.nn.functional as F

# The papers' beta for each method (DESIGN.md section 6 table); kto's also serves rko.
DEFAULT_BETA = {'sft': 0.0, 'dpo': 10.0, 'rpo': 20.0, 'kto': 12.0, 'rko': 12.0, 'fkpd': 10.0}


def _utility(x, utility):
    if utility == 'sigmoid':
        return torch.sigmoid(x)
    if utility == 'log_sigmoid':
        return F.logsigmoid(x)
    raise ValueError(f"utility={utility!r}: use 'sigmoid' or 'log_sigmoid'")


def _margin(g, q, beta):
    """Mean implied reward of desirable minus undesirable samples (the model-selection metric)."""
    r = beta * g.detach()
    pos, neg = r[q > 0], r[q < 0]
    if len(pos) == 0 or len(neg) == 0:
        return float('nan')
    return float(pos.mean() - neg.mean())


def sft_loss(e_theta_desirable):
    """Plain fine-tuning: the denoising error on desirable samples only."""
    loss = e_theta_desirable.mean()
    return loss, {'loss': float(loss.detach()), 'e_theta': float(loss.detach())}


def dpo_loss(g_w, g_l, beta=10.0):
    """Diffusion-DPO: -mean log sigmoid(beta (g_w - g_l)); pair i shares t and eps."""
    logits = beta * (g_w - g_l)
    loss = -F.logsigmoid(logits).mean()
    return loss, {'loss': float(loss.detach()), 'margin': float((beta * (g_w - g_l)).detach().mean()),
                  'accuracy': float((logits > 0).float().mean())}


def rpo_loss(g_w, g_l, W, beta=20.0):
    """RPO: all Mw x Ml cross pairs, the similarity weight on the logit: -mean log sigmoid(beta W (g_w_i - g_l_j))."""
    W = W.detach()
    diff = g_w.view(-1, 1) - g_l.view(1, -1)
    loss = -F.logsigmoid(beta * W * diff).mean()
    return loss, {'loss': float(loss.detach()), 'margin': float(beta * diff.detach().mean()),
                  'w_mean': float(W.mean()), 'w_max': float(W.max())}


def kto_reference_point(g):
    """z0 = max(0, mean_b g_b), detached (KTO's KL estimate in log-ratio form)."""
    return torch.clamp(g.detach().mean(), min=0.0)


def kto_loss(g, q, beta=12.0, lambda_d=1.0, lambda_u=1.0, utility='sigmoid', weights=None,
             reference_point=None):
    """Diffusion-KTO: u_b = sigmoid(q_b beta (g_b - z0)); loss = mean_b lambda_{q_b} (1 - u_b).

    With `utility='log_sigmoid'` (the HALOs loss-averse option) the per-sample loss is -log sigmoid.
    `weights` (stop-gradient, per sample) turns the mean into sum_b s_b l_b / sum_b s_b: that is RKO;
    with all weights 1 it is exactly this KTO loss.
    `reference_point` (detached) replaces the batch estimate max(0, mean g): the tabular bandit
    (bandit.py) passes the exact mean over arms, which may be negative, so that its fixed point is the
    centred one of DESIGN.md section 6; the trainer leaves it None.
    """
    q = q.to(g.dtype)
    z0 = kto_reference_point(g) if reference_point is None else reference_point.detach()
    x = q * beta * (g - z0)
    lam = torch.where(q > 0, torch.full_like(g, lambda_d), torch.full_like(g, lambda_u))
    per_sample = lam * ((1.0 - _utility(x, utility)) if utility == 'sigmoid' else -_utility(x, utility))
    if weights is None:
        loss = per_sample.mean()
    else:
        s = weights.detach().to(g.dtype)
        loss = (s * per_sample).sum() / s.sum()
    metrics = {'loss': float(loss.detach()), 'z0': float(z0), 'margin': _margin(g, q, beta),
               'reward_desirable': float((beta * g.detach())[q > 0].mean()) if (q > 0).any() else float('nan'),
               'reward_undesirable': float((beta * g.detach())[q < 0].mean()) if (q < 0).any() else float('nan')}
    if weights is not None:
        metrics.update({'w_mean': float(weights.mean()), 'w_min': float(weights.min()),
                        'w_max': float(weights.max())})
    return loss, metrics


def rko_loss(g, q, weights, beta=12.0, lambda_d=1.0, lambda_u=1.0, utility='sigmoid',
             reference_point=None):
    """RKO: KTO's per-sample utility, weighted by observation similarity (weights.rko_weights)."""
    return kto_loss(g, q, beta, lambda_d, lambda_u, utility, weights=weights,
                    reference_point=reference_point)


def fkpd_loss(g_w, g_l, e_theta_behaviour, beta=10.0, lambda_fkl=1.0):
    """FKPD: DPO plus a forward-KL term on the pretraining (behaviour) data, as denoising MSE."""
    dpo, metrics = dpo_loss(g_w, g_l, beta)
    fkl = e_theta_behaviour.mean()
    loss = dpo + lambda_fkl * fkl
    metrics.update({'loss': float(loss.detach()), 'dpo': float(dpo.detach()), 'forward_kl': float(fkl.detach())})
    return loss, metrics
