"""Query sampler: the bandit's mixed sampler over recorded episodes."""
import copy

import numpy as np
import pytest
import torch

from rko_ros.alignment import sampler
from rko_ros.policy.config import PolicyConfig
from rko_ros.policy.model import DiffusionPolicy
from rko_ros.policy.synthetic import RIGHT, make_two_mode_windows
from rko_ros.policy.train import collate


def test_pair_probabilities_by_hand():
    g = [0.0, 1.0]
    P = sampler.mixed_pair_probabilities(g, beta=1.0, mix=0.5)
    # uniform over the 2 off-diagonal pairs: 0.25 each; pi_s ∝ exp(x): e^-1 and e^1
    e = np.e
    assert P[0, 0] == P[1, 1] == 0.0
    assert P[1, 0] == pytest.approx(0.25 + 0.5 * e / (e + 1 / e))
    assert P[0, 1] == pytest.approx(0.25 + 0.5 * (1 / e) / (e + 1 / e))
    assert P.sum() == pytest.approx(1.0)


def test_label_probabilities_favour_the_extremes_and_are_uniform_at_zero():
    assert np.allclose(sampler.mixed_label_probabilities([0, 0, 0, 0]), 0.25)
    p = sampler.mixed_label_probabilities([-2.0, 0.0, 0.1, 2.0], beta=2.0)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] > p[1] and p[3] > p[2] and p[0] == pytest.approx(p[3], rel=0.05)


def test_suggest_queries_is_seeded_distinct_and_skips_compared_pairs():
    implied = {f'ep{i}': g for i, g in enumerate([-1.0, -0.2, 0.0, 0.3, 1.2])}
    a = sampler.suggest_queries(implied, n=3, kind='label', seed=3)
    assert a == sampler.suggest_queries(implied, n=3, kind='label', seed=3)
    assert len({d['episode_id'] for d in a}) == 3
    pairs = sampler.suggest_queries(implied, n=20, kind='compare', exclude_pairs=[('ep4', 'ep0')])
    assert len(pairs) == 9  # 10 unordered pairs minus the one already compared
    assert all({d['a'], d['b']} != {'ep0', 'ep4'} for d in pairs)
    # the most likely remaining pair spans the widest implied-reward gap
    assert {pairs[0]['a'], pairs[0]['b']} in ({'ep1', 'ep4'}, {'ep0', 'ep3'})
    assert sampler.suggest_queries({'ep0': 0.0}, kind='compare') == []
    with pytest.raises(ValueError):
        sampler.suggest_queries(implied, kind='rate')


def test_implied_log_ratios_rise_on_episodes_the_model_moved_toward():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = PolicyConfig.preset(
        'small', obs={'image_size_px': [32, 32]},
        model={'encoder_channels': [8, 16], 'feature_dim': 16, 'down_dims': [32, 64],
               'diffusion_step_embed_dim': 32})
    modes = np.repeat(np.arange(4) % 2, 8)
    windows, _ = make_two_mode_windows(config, n=32, modes=modes, seed=1)
    windows.episode_index = np.arange(32) // 8
    reference = DiffusionPolicy(config)
    reference.fit_normalizer(windows.state.reshape(-1, config.obs.state_dim),
                             windows.action.reshape(-1, config.action.action_dim))
    opt = torch.optim.Adam(reference.parameters(), lr=2e-3)
    for _ in range(80):  # "pretraining" on both modes: the later gap is not generic denoising
        loss = reference.bc_loss(collate(windows, np.arange(32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = ['a', 'b', 'c', 'd']
    same = sampler.implied_log_ratios(reference, copy.deepcopy(reference), windows, episode_ids=ids)
    assert list(same) == ids and all(v == 0.0 for v in same.values())
    policy = copy.deepcopy(reference)
    opt = torch.optim.Adam(policy.parameters(), lr=2e-3)
    right = np.flatnonzero(modes == RIGHT)
    for _ in range(40):  # behaviour cloning on the RIGHT-mode episodes only
        loss = policy.bc_loss(collate(windows, right))
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = sampler.implied_log_ratios(policy, reference, windows, episode_ids=ids)
    favoured = [g[ids[k]] for k in range(4) if k % 2 == RIGHT]
    other = [g[ids[k]] for k in range(4) if k % 2 != RIGHT]
    print('implied log-ratios:', g)
    assert min(favoured) > max(other) and max(favoured) > 0


def _untrained_policy():
    """A tiny policy with its normalizer fitted on the two-mode task (no training)."""
    config = PolicyConfig.preset(
        'small', obs={'image_size_px': [32, 32]},
        model={'encoder_channels': [8, 16], 'feature_dim': 16, 'down_dims': [32, 64],
               'diffusion_step_embed_dim': 32})
    windows, _ = make_two_mode_windows(config, n=8)
    policy = DiffusionPolicy(config)
    policy.fit_normalizer(windows.state.reshape(-1, config.obs.state_dim),
                          windows.action.reshape(-1, config.action.action_dim))
    return policy


def test_suggest_from_store_uniform_for_a_pretrained_model_and_clear_errors(tmp_path):
    from rko_ros.episodes.catalog import Catalog
    from rko_ros.errors import EpisodeError
    from rko_ros.policy.store import ModelStore

    with pytest.raises(EpisodeError, match='no active model'):
        sampler.suggest_from_store(tmp_path)
    policy = _untrained_policy()
    ModelStore(tmp_path).write_version(policy, method='pretrain', activate=True)
    with pytest.raises(EpisodeError, match='no unlabelled complete episodes'):
        sampler.suggest_from_store(tmp_path)
    with Catalog(tmp_path) as catalog:
        ids = []
        for _ in range(4):
            eid = catalog.start_episode('v0001-pretrain')
            catalog.finish_episode(eid, complete=True)
            ids.append(eid)
        catalog.label(ids[0], True)
        catalog.prefer(ids[1], ids[2])
    got = sampler.suggest_from_store(tmp_path, n=10, kind='label')
    assert sorted(d['episode_id'] for d in got) == sorted(ids[1:])
    assert all(d['g'] == 0.0 and d['p'] == pytest.approx(1 / 3) for d in got)
    pairs = sampler.suggest_from_store(tmp_path, n=10, kind='compare')
    assert len(pairs) == 5 and all({d['a'], d['b']} != {ids[1], ids[2]} for d in pairs)


def test_rko_episodes_suggest_cli_ranks_the_moved_episodes(tmp_path, capsys):
    """`rko episodes suggest` on a fine-tuned version: real catalog, store and CLI."""
    import json

    from rko_ros.cli import main
    from rko_ros.episodes.catalog import Catalog
    from rko_ros.policy.store import ModelStore

    policy = _untrained_policy()
    store = ModelStore(tmp_path)
    parent = store.write_version(policy, method='pretrain', activate=True)
    with Catalog(tmp_path) as catalog:
        for _ in range(3):
            catalog.finish_episode(catalog.start_episode(parent), complete=True)
    assert main(['episodes', 'suggest', '--data-dir', str(tmp_path), '--n', '2', '--json']) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(got) == 2 and all(d['g'] == 0.0 for d in got)
    assert main(['episodes', 'suggest', '--data-dir', str(tmp_path), '--kind', 'compare',
                 '--n', '9']) == 0
    table = capsys.readouterr().out
    assert table.count('rko episodes prefer') == 3  # all 3 unordered pairs of 3 episodes
    assert main(['episodes', 'suggest', '--data-dir', str(tmp_path), '--n', '0']) == 2
    assert '--n 0' in capsys.readouterr().err
