"""Query sampler: which recorded episodes the operator should label or compare next.

It is the mixed sampler of the bandit theory (DESIGN.md section 6, bandit.py) applied to episodes:
with `g(e)` the implied log-ratio of episode e under the current model (mean over its windows of
e_ref - e_theta, parent = reference, shared t and eps) and `x(e, e') = beta (g(e) - g(e'))`,
- compare queries: pairs drawn from `mix * uniform + (1 - mix) * pi_s`, `pi_s(e, e') ∝ exp(x(e, e'))`
  (e ~ (pi/pi_ref)^beta, e' ~ (pi_ref/pi)^beta): the pairs where the model has moved most apart,
  which is where a preference teaches the most (the sampler that made DPO quadratic);
- label queries: the single-episode version, `mix * uniform + (1 - mix)/2 * (softmax(beta g) +
  softmax(-beta g))`: the episodes the model now likes or dislikes most relative to its parent.
[choice] mix = 0.5 (the theory's equal alpha_1 / alpha_2 split); draws without replacement with a
fixed seed so the same catalog gives the same suggestions. A pretrained model (no parent) has g = 0
everywhere: the suggestions are uniform.

`mixed_pair_probabilities`, `mixed_label_probabilities` and `suggest_queries` are numpy only;
`implied_log_ratios` and `suggest_from_store` import torch, the policy store and the episodes
dataset lazily. This module must not import rclpy.
"""
import numpy as np

from rko_ros.errors import EpisodeError


def _softmax(v):
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def mixed_pair_probabilities(g, beta=1.0, mix=0.5):
    """(n,) implied log-ratios -> (n, n) probabilities of asking about the ordered pair (e, e')."""
    g = np.asarray(g, dtype=np.float64)
    n = len(g)
    off = ~np.eye(n, dtype=bool)  # a pair of an episode with itself teaches nothing
    uniform = off / off.sum()
    x = beta * (g[:, None] - g[None, :])
    ps = np.where(off, np.exp(x - x[off].max()), 0.0)
    ps /= ps.sum()
    return mix * uniform + (1.0 - mix) * ps


def mixed_label_probabilities(g, beta=1.0, mix=0.5):
    g = np.asarray(g, dtype=np.float64)
    uniform = np.full(len(g), 1.0 / len(g))
    return mix * uniform + (1.0 - mix) * 0.5 * (_softmax(beta * g) + _softmax(-beta * g))


def suggest_queries(implied, n=5, kind='label', beta=1.0, mix=0.5, seed=0, exclude_pairs=()):
    """Suggest up to n queries from {episode_id: implied log-ratio g}.

    kind='label' -> [{'episode_id', 'g', 'p'}]; kind='compare' -> [{'a', 'b', 'g_a', 'g_b', 'p'}]
    (unordered pairs, each at most once; `exclude_pairs` = pairs already compared). Highest
    probability first among the drawn ones.
    """
    if kind not in ('label', 'compare'):
        raise ValueError(f"kind={kind!r}: use 'label' or 'compare'")
    ids = list(implied)
    g = np.array([implied[i] for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    if kind == 'label':
        if not ids:
            return []
        p = mixed_label_probabilities(g, beta, mix)
        k = min(n, len(ids))
        pick = rng.choice(len(ids), size=k, replace=False, p=p)
        out = [{'episode_id': ids[i], 'g': float(g[i]), 'p': float(p[i])} for i in pick]
        return sorted(out, key=lambda d: -d['p'])
    if len(ids) < 2:
        return []
    P = mixed_pair_probabilities(g, beta, mix)
    P = P + P.T  # an unordered pair: both orders; the operator says which is better
    done = {frozenset(p) for p in exclude_pairs}
    cand = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))
            if frozenset((ids[i], ids[j])) not in done]
    if not cand:
        return []
    w = np.array([P[i, j] for i, j in cand])
    w = w / w.sum()
    k = min(n, len(cand))
    pick = rng.choice(len(cand), size=k, replace=False, p=w)
    out = [{'a': ids[cand[c][0]], 'b': ids[cand[c][1]], 'g_a': float(g[cand[c][0]]),
            'g_b': float(g[cand[c][1]]), 'p': float(w[c])} for c in pick]
    return sorted(out, key=lambda d: -d['p'])


def implied_log_ratios(policy, reference, windows, reduction='sum', max_windows_per_episode=32,
                       seed=0, device='cpu', episode_ids=None):
    """{episode_id: mean over (up to N of) its windows of e_ref - e_theta}, fixed (t, eps).

    Episode k of `windows.episode_index` is named `episode_ids[k]` (default: `windows.episode_ids`,
    else its index as text).
    """
    import torch

    from rko_ros.policy.train import collate

    rng = np.random.default_rng(seed)
    gen = torch.Generator(device='cpu').manual_seed(seed)
    out = {}
    policy.eval()
    reference.eval()
    if episode_ids is None:
        episode_ids = getattr(windows, 'episode_ids', None) or \
            [str(k) for k in range(int(windows.episode_index.max()) + 1)]
    with torch.no_grad():
        for k, eid in enumerate(episode_ids):
            idx = np.flatnonzero(windows.episode_index == k)
            if len(idx) == 0:
                continue
            if len(idx) > max_windows_per_episode:
                idx = np.sort(rng.choice(idx, size=max_windows_per_episode, replace=False))
            batch = collate(windows, idx, device)
            t, eps = policy.sample_timesteps_and_noise(len(idx), generator=gen, device='cpu')
            t, eps = t.to(device), eps.to(device)
            e_theta = policy.denoise_error(batch, t, eps, reduction)
            e_ref = reference.denoise_error(batch, t, eps, reduction)
            out[eid] = float((e_ref - e_theta).mean())
    return out


def suggest_from_store(data_dir, n=5, kind='label', version=None, beta=None, mix=0.5, seed=0,
                       camera_topics=None, progress=False):
    """Suggestions for the episodes of a data dir under a model version (default: the active one).

    label: complete episodes without a current label; compare: pairs of complete episodes not yet
    compared. The reference is the version's parent (none: g = 0, uniform suggestions). beta
    defaults to the version card's finetune beta, else 1.
    """
    from rko_ros.episodes.catalog import Catalog
    from rko_ros.episodes.dataset import WindowSpec, load_windows
    from rko_ros.policy.store import ModelStore

    store = ModelStore(data_dir)
    version = version or store.active_version()
    if version is None:
        raise EpisodeError(f'no active model in {data_dir}; pretrain with `rko train` or pass a version')
    card = store.read_card(version)
    with Catalog(data_dir) as catalog:
        complete = [e['id'] for e in catalog.list(status='complete')]
        labelled = catalog.labelled_episodes()
        prefs = [(p['winner_id'], p['loser_id']) for p in catalog.preferences()]
    episodes = [e for e in complete if e not in labelled] if kind == 'label' else complete
    if not episodes:
        raise EpisodeError(f'no {"unlabelled " if kind == "label" else ""}complete episodes in '
                           f'{data_dir} to suggest; record some first')
    parent = card.get('parent')
    if beta is None:
        beta = float((card.get('hyperparameters') or {}).get('beta') or 1.0)
    if not parent:
        implied = {e: 0.0 for e in episodes}
    else:
        policy = store.load_policy(version)
        reference = store.load_policy(parent)
        topics = {'cameras': camera_topics or card.get('camera_topics') or None}
        spec = WindowSpec.from_config(policy.config, topics)
        windows = load_windows(data_dir, episodes, spec, progress=progress)
        implied = implied_log_ratios(policy, reference, windows, seed=seed)
    return suggest_queries(implied, n=n, kind=kind, beta=beta, mix=mix, seed=seed,
                           exclude_pairs=prefs)
