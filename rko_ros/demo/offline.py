"""Offline pieces of the cloth demo: demonstrations -> windows, policy rollouts, judging.

Rollouts run several simulated cloths in lockstep and ask the policy for all their chunks in one
batched call (ONNX Runtime or the torch policy): evaluation of 20 episodes costs a few seconds.
The ROS loop (demo/loop.py) runs the same policy through the real nodes instead.
"""
import dataclasses

import numpy as np

from rko_ros.sim.demonstrator import demo_episode
from rko_ros.sim.task import ClothFoldTask, TaskConfig


def episode_windows(images, states, actions, n_obs_steps, horizon):
    """Cut one episode (T ticks) into T windows, as policy training sees them.

    Window k: frames and states of ticks k-To+1..k (clamped at the first tick), the commanded
    actions of ticks k..k+H-1 (the last action repeated past the end, as Chi et al. pad).
    images (T,H,W,3) or, for N cameras, (T,N,H,W,3) uint8 -> window images (T,To,N,3,H,W).
    """
    t_len = len(actions)
    obs_idx = np.clip(np.arange(t_len)[:, None] + np.arange(-n_obs_steps + 1, 1)[None, :], 0, t_len - 1)
    act_idx = np.clip(np.arange(t_len)[:, None] + np.arange(horizon)[None, :], 0, t_len - 1)
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, None]
    chw = np.ascontiguousarray(images.transpose(0, 1, 4, 2, 3))
    return chw[obs_idx], np.asarray(states, np.float32)[obs_idx], \
        np.asarray(actions, np.float32)[act_idx]


def episode_cameras(episode):
    """A rollout's images as (T, N, H, W, 3): the scene camera, then the wrist camera if any."""
    if 'wrist_images' in episode:
        return np.stack([episode['images'], episode['wrist_images']], axis=1)
    return np.asarray(episode['images'])[:, None]


def collect_demonstrations(task_config, styles, episodes_per_style, seed=0, noise=1.0, progress=None,
                           shared_poses=True, attempts=1):
    """Scripted folds in every style: a list of rollout dicts (images, state, action, result, style,
    attempt).

    `attempts` > 1: only successful folds are kept, as a team keeps only the teleoperated
    demonstrations that worked. A fold that fails (or lands in another style) is demonstrated
    again on the same cloth with a new noise draw, up to `attempts` times in all; a cloth and
    style that fail every time are left out. 1: every demonstration is kept as it came.

    `shared_poses`: every style is demonstrated on the same cloth placements (seed + i), so the
    cloth's pose says nothing about the style. With a placement of its own per demonstration, a
    policy trained on 20 per style learns style = f(placement): on new cloths its style follows
    the nearest demonstrated placement (19 of 20 rollouts kept their style under new diffusion
    noise), and labels then move the style only near the labelled placements.
    """
    task = ClothFoldTask(task_config)
    episodes = []
    for i in range(episodes_per_style):
        for j, style in enumerate(styles):
            cloth = seed + i if shared_poses else seed + 1000 * j + i
            for attempt in range(max(1, int(attempts))):
                episode = demo_episode(task, style, seed=cloth, noise=noise, attempt=attempt)
                result = episode['result']
                if attempts <= 1 or (result.success and result.style == style):
                    episodes.append(episode)
                    break
            if progress is not None:
                progress.update(1)
    return episodes


def windows_from_episodes(episodes, config):
    from rko_ros.policy.train import ArrayWindows
    parts = [episode_windows(episode_cameras(e), e['state'], e['action'], config.obs.n_obs_steps,
                             config.action.horizon) for e in episodes]
    index = np.concatenate([np.full(len(e['action']), i) for i, e in enumerate(episodes)])
    return ArrayWindows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        np.concatenate([p[2] for p in parts]), episode_index=index)


class BatchedChunkPolicy:
    """Receding-horizon control of B episodes at once: a new chunk every n_action_steps ticks.

    `predict(images (B,To,N,3,H,W) uint8, state (B,To,S), noise (B,H,A)) -> actions (B,H,A)`.
    """

    def __init__(self, predict, n_obs_steps, horizon, action_dim, n_action_steps, seed=0,
                 noise_scale=1.0, candidates=1, action_scale=None):
        from rko_ros.policy.runtime import check_chunk_candidates, check_noise_scale
        self.predict = predict
        self.noise_scale = np.float32(check_noise_scale(noise_scale))
        self.n_obs_steps, self.horizon, self.action_dim = n_obs_steps, horizon, action_dim
        self.n_action_steps = n_action_steps
        self.rng = np.random.default_rng(seed)
        # Coherent chunks (policy_node chunk_candidates): candidate 0 keeps the draw of one
        # sample per chunk, the others come from a stream of their own.
        self.candidates = check_chunk_candidates(candidates)
        self.extra_rng = np.random.default_rng(
            None if seed is None else [*np.atleast_1d(seed).tolist(), 104729])
        self.action_scale = action_scale

    def _coherent(self, images, states, noise, previous):
        """The chunk of `candidates` draws closest to `previous` (what the last chunk planned for
        the ticks this one starts at), as the policy node picks with chunk_candidates."""
        from rko_ros.policy.runtime import choose_coherent
        b, k = len(images), self.candidates
        extra = self.extra_rng.standard_normal((b, k - 1, self.horizon, self.action_dim))
        noises = np.concatenate([noise[:, None], extra.astype(np.float32) * self.noise_scale], 1)
        return choose_coherent(self.predict, images, states, noises, previous,
                               self.action_scale)[0]

    def run(self, tasks, seeds, record_images=False, extra_sizes=()):
        for task, seed in zip(tasks, seeds):
            task.reset(seed)
        b = len(tasks)
        history_img, history_state = [], []
        chunk, used = None, self.n_action_steps
        trace = {'images': [], 'state': [], 'action': []}
        frames = [[] for _ in tasks]
        while not all(task.done for task in tasks):
            img = np.stack([task.cameras().transpose(0, 3, 1, 2) for task in tasks])  # B,N,3,H,W
            state = np.stack([task.state() for task in tasks])
            history_img.append(img)
            history_state.append(state)
            if extra_sizes:
                for f, task in zip(frames, tasks):
                    f.append(task.render(extra_sizes[0]))
            if used >= self.n_action_steps:
                idx = [max(0, len(history_img) - self.n_obs_steps + k) for k in range(self.n_obs_steps)]
                images = np.stack([history_img[i] for i in idx], axis=1)          # B,To,N,3,H,W
                states = np.stack([history_state[i] for i in idx], axis=1)        # B,To,S
                noise = self.rng.standard_normal((b, self.horizon, self.action_dim)).astype(np.float32)
                noise *= self.noise_scale   # as the policy node does (its noise_scale)
                if self.candidates == 1:
                    chunk = self.predict(images, states, noise)
                else:
                    chunk = self._coherent(images, states, noise, None if chunk is None
                                           else chunk[:, used:])
                used = 0
            action = chunk[:, used]
            used += 1
            if record_images:
                trace['images'].append(img.transpose(0, 1, 3, 4, 2))            # B,N,H,W,3
            trace['state'].append(state)
            trace['action'].append(action)
            for task, a in zip(tasks, action):
                task.step(a)
        results = [task.result() for task in tasks]
        episodes = []
        for i, seed in enumerate(seeds):
            episode = {'seed': seed, 'state': np.stack([s[i] for s in trace['state']]),
                       'action': np.stack([a[i] for a in trace['action']]), 'result': results[i]}
            if record_images:
                cams = np.stack([im[i] for im in trace['images']])               # T,N,H,W,3
                episode['images'] = cams[:, 0]
                if cams.shape[1] > 1:
                    episode['wrist_images'] = cams[:, 1]
            if extra_sizes:
                frames[i].append(tasks[i].render(extra_sizes[0]))
                episode['frames'] = frames[i]
            episodes.append(episode)
        return episodes


def runtime_predictor(runtime):
    return lambda images, state, noise: runtime.predict(images, state, noise)


def torch_predictor(policy):
    import torch

    def predict(images, state, noise):
        with torch.inference_mode():
            return policy.sample(torch.as_tensor(images), torch.as_tensor(state),
                                 torch.as_tensor(noise)).numpy()
    return predict


def evaluate_policy(predict, card_like, task_config, seeds, batch=10, record_images=False,
                    seed=0, extra_sizes=(), noise_scale=1.0, candidates=1):
    """Roll out `predict` on the cloth for each seed; returns the rollout dicts (with `result`).

    The diffusion noise is drawn from (`seed`, first cloth seed), so stages with disjoint cloth
    seeds (labelling, evaluation) get independent noise rather than one replayed stream.
    """
    from rko_ros.policy.runtime import action_scale
    noise_seed = [int(seed), int(seeds[0]) if len(seeds) else 0]
    runner = BatchedChunkPolicy(predict, card_like['n_obs_steps'], card_like['horizon'],
                                len(card_like['action_names']), card_like['n_action_steps'],
                                seed=noise_seed, noise_scale=noise_scale, candidates=candidates,
                                action_scale=action_scale(card_like))
    episodes = []
    for start in range(0, len(seeds), batch):
        chunk_seeds = list(seeds[start:start + batch])
        tasks = [ClothFoldTask(task_config) for _ in chunk_seeds]
        episodes += runner.run(tasks, chunk_seeds, record_images=record_images,
                               extra_sizes=extra_sizes)
    return episodes


def card_like(config):
    return {'n_obs_steps': config.obs.n_obs_steps, 'horizon': config.action.horizon,
            'action_names': list(config.action.action_names),
            'n_action_steps': config.action.n_action_steps}


def summarize(results, preferred_style):
    """Success rate of the preferred style, per-style shares, mean quality (FoldResults)."""
    return summarize_dicts([{'style': r.style, 'quality': r.quality, 'success': r.success,
                             'grasp_offset_m': r.grasp_offset_m} for r in results], preferred_style)


def summarize_dicts(results, preferred_style):
    """The same from dicts with style, quality, success (sim/evaluate's JSON)."""
    styles = [r.get('style', 'none') for r in results]
    n = max(1, len(results))
    preferred_ok = [bool(r.get('success')) and r.get('style') == preferred_style for r in results]
    return {'episodes': len(results),
            'preferred_success': round(sum(preferred_ok) / n, 4),
            'preferred_style_share': round(sum(s == preferred_style for s in styles) / n, 4),
            'success_any_style': round(sum(bool(r.get('success')) for r in results) / n, 4),
            'mean_quality': round(float(np.mean([r.get('quality', 0.0) for r in results])), 4)
            if results else 0.0,
            'style_counts': {s: styles.count(s) for s in sorted(set(styles))},
            **_grasp_summary(results)}


def _grasp_summary(results):
    """Why folds fail: the share of episodes whose first grasp missed the folded style's grasp
    particle, and how many never held the cloth (older outcomes without the key are left out)."""
    known = [r for r in results if 'grasp_offset_m' in r]
    if not known:
        return {}
    offsets = [r['grasp_offset_m'] for r in known]
    grasped = [o for o in offsets if o is not None]
    return {'grasp_off_target_share': round(sum(o > 1e-6 for o in grasped) / max(1, len(grasped)), 4),
            'no_grasp': len(offsets) - len(grasped)}
