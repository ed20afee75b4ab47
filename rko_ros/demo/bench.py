"""`rko bench alignment`: every method from the same pretrained policy and the same labels.

The labelled rollouts are drawn once (the largest label count; smaller counts take a prefix), so
methods differ only in their loss. Evaluation rollouts are batched through ONNX Runtime offline:
the same runtime the policy node uses, without the real-time pacing of the ROS loop.
"""
import os

import numpy as np

from rko_ros.demo import offline, pipeline
from rko_ros.demo.report import binomial_standard_error
from rko_ros.errors import GuardRejected, RkoError


def labelled_rollouts(cfg, version_dir, count):
    from rko_ros.policy.runtime import PolicyRuntime
    from rko_ros.sim.operator import SimulatedOperator
    runtime = PolicyRuntime(version_dir)
    episodes = offline.evaluate_policy(offline.runtime_predictor(runtime), runtime.card,
                                       cfg.task_config(), pipeline.seeds_for('label', count, cfg.seed),
                                       batch=10, record_images=True, seed=cfg.seed,
                                       noise_scale=cfg.noise_scale,
                                       candidates=cfg.chunk_candidates)
    operator = SimulatedOperator(cfg.preferred_style)
    return episodes, [operator.label(e['result']) for e in episodes]


def labelled_data(episodes, labels, policy_config):
    from rko_ros.alignment.trainer import LabelledWindows
    windows = offline.windows_from_episodes(episodes, policy_config)
    per_window = np.where(np.asarray(labels)[windows.episode_index], 1, -1)
    return LabelledWindows(windows, per_window, windows.episode_index,
                           [f'rollout{i:03d}' for i in range(len(episodes))])


def evaluate_version(cfg, version_dir, eval_episodes, seed=0):
    from rko_ros.policy.runtime import PolicyRuntime
    runtime = PolicyRuntime(version_dir)
    episodes = offline.evaluate_policy(offline.runtime_predictor(runtime), runtime.card,
                                       cfg.task_config(), pipeline.seeds_for('after', eval_episodes, cfg.seed),
                                       batch=10, seed=seed, noise_scale=cfg.noise_scale,
                                       candidates=cfg.chunk_candidates)
    return offline.summarize([e['result'] for e in episodes], cfg.preferred_style)


def run_alignment_bench(cfg, methods, label_counts, seeds, eval_episodes, progress=True, first_seed=0):
    """Fine-tuning seeds first_seed .. first_seed + seeds - 1 (another process or machine can run
    the next ones; `merge_results` puts them together)."""
    from tqdm import tqdm
    from rko_ros.alignment.trainer import FinetuneConfig, finetune
    from rko_ros.demo.commands import _pretrained
    from rko_ros.policy.store import ModelStore

    pipeline.ensure_dir(cfg.data_dir)
    parent, _, _ = _pretrained(cfg, progress=progress)
    store = ModelStore(cfg.data_dir)
    policy_config = store.load_policy(parent).config
    pretrained = evaluate_version(cfg, store.version_dir(parent), eval_episodes)
    label_counts = sorted(set(int(n) for n in label_counts))
    episodes, labels = labelled_rollouts(cfg, store.version_dir(parent), label_counts[-1])
    behaviour = None
    if 'fkpd' in methods or cfg.lambda_retrieved:
        from rko_ros.episodes.dataset import load_windows
        behaviour = load_windows(cfg.data_dir, store.read_card(parent)['episodes'],
                                 pipeline.window_spec(policy_config), progress=False)
    runs = []
    bar = tqdm(total=len(methods) * len(label_counts) * seeds, desc='fine-tune + evaluate',
               unit='run', disable=not progress)
    for n in label_counts:
        data = labelled_data(episodes[:n], labels[:n], policy_config)
        for method in methods:
            for s in range(first_seed, first_seed + seeds):
                row = {'method': method, 'labels': n, 'seed': s,
                       'desirable': int(sum(labels[:n]))}
                try:
                    fc = FinetuneConfig(method=method, steps=cfg.finetune_steps,
                                        batch_size=max(4, cfg.batch_size // 2), seed=cfg.seed + s,
                                        lr=cfg.finetune_lr,
                                        lambda_sft=cfg.lambda_sft, lambda_u=cfg.lambda_u,
                                        lambda_d=cfg.lambda_d,
                                        patience=cfg.finetune_patience,
                                        select=cfg.finetune_select,
                                        ema_decay=cfg.finetune_ema_decay,
                                        freeze_encoder=cfg.freeze_encoder,
                                        lambda_retrieved=cfg.lambda_retrieved,
                                        retrieved_undesirable_share=cfg.finetune_undesirable_share(method),
                                        preference_min_timestep=cfg.preference_min_timestep,
                                        guard_tolerance=cfg.guard_tolerance)
                    version, summary = finetune(store, parent, data, fc, behaviour=behaviour,
                                                device=cfg.device, progress=False)
                    row.update(evaluate_version(cfg, store.version_dir(version), eval_episodes, seed=s))
                    row['version'] = version
                except GuardRejected as exc:
                    # The execution guard kept the pretrained model: that is what would run.
                    row.update({k: pretrained[k] for k in ('preferred_success', 'mean_quality',
                                                           'grasp_off_target_share') if k in pretrained},
                               rejected=str(exc))
                except Exception as exc:  # e.g. no desirable label among the first n: record it
                    row['error'] = str(exc)
                runs.append(row)
                bar.update(1)
    bar.close()
    table = summarize_runs(runs, methods, label_counts, eval_episodes)
    result = {'bench': 'alignment', 'preferred_style': cfg.preferred_style, 'methods': list(methods),
              'labels': label_counts, 'seeds': seeds, 'first_seed': first_seed,
              'eval_episodes': eval_episodes,
              'finetune_steps': cfg.finetune_steps, 'finetune_lr': cfg.finetune_lr,
              'lambda_sft': cfg.lambda_sft,
              'finetune_select': cfg.finetune_select, 'finetune_ema_decay': cfg.finetune_ema_decay,
              'lambda_u': cfg.lambda_u, 'lambda_d': cfg.lambda_d, 'freeze_encoder': cfg.freeze_encoder,
              'lambda_retrieved': cfg.lambda_retrieved,
              'retrieved_undesirable_share': cfg.retrieved_undesirable_share,
              'preference_min_timestep': cfg.preference_min_timestep,
              'guard_tolerance': cfg.guard_tolerance, 'noise_scale': cfg.noise_scale,
              'chunk_candidates': cfg.chunk_candidates,
              'pretrained_version': parent,
              'pretrained': pretrained, 'table': table, **leads(table, methods, label_counts),
              'runs': runs}
    result['plot'] = _plot(result, os.path.join(cfg.data_dir, 'alignment_bench.png'))
    return result


def summarize_runs(runs, methods, label_counts, eval_episodes):
    """{method: {str(labels): cell}} from the run rows: the mean over seeds, its standard error,
    and the reasons of runs that failed (a cell whose runs all failed has None, not a NaN that
    reads like a result)."""
    table = {}
    for method in methods:
        table[method] = {}
        for n in label_counts:
            cells = [r for r in runs if r['method'] == method and r['labels'] == n]
            done = [r for r in cells if 'error' not in r]
            rates = [r['preferred_success'] for r in done]
            table[method][str(n)] = {
                'preferred_success_mean': _mean_of(done, 'preferred_success'),
                'preferred_success_runs': rates,
                'preferred_success_se': standard_error(rates, eval_episodes),
                'mean_quality_mean': _mean_of(done, 'mean_quality'),
                'grasp_off_target_share_mean': _mean_of(done, 'grasp_off_target_share'),
                'errors': sorted({r['error'] for r in cells if 'error' in r})}
    return table


def leads(table, methods, label_counts):
    """The JSON's lead keys: at the largest label count (`rko_ahead_of`,
    `rko_ahead_beyond_two_se_of`) and at each (`rko_ahead_by_labels`), since a method can lead
    with few labels and not with many."""
    by_labels = {}
    for n in label_counts:
        ahead, clearly = ahead_of(table, methods, str(n))
        by_labels[str(n)] = {'ahead_of': ahead, 'beyond_two_se_of': clearly}
    top = by_labels[str(label_counts[-1])]
    return {'rko_ahead_of': top['ahead_of'], 'rko_ahead_beyond_two_se_of': top['beyond_two_se_of'],
            'rko_ahead_by_labels': by_labels}


# What a merge recomputes from the runs; every other key of the JSON lines must agree.
_MERGED_KEYS = ('methods', 'labels', 'seeds', 'first_seed', 'table', 'runs', 'rko_ahead_of',
                'rko_ahead_beyond_two_se_of', 'rko_ahead_by_labels', 'plot')
# Settings a result carries only since they became options: the value every earlier run had, so
# a result written before (docs/bench/) still merges with a new one of the same setting.
_SETTING_DEFAULTS = {'lambda_d': 1.0, 'chunk_candidates': 1}   # results written before the key


def _setting(result, key):
    return result.get(key, _SETTING_DEFAULTS.get(key))


def merge_results(results, plot_path=None):
    """One bench result from several runs of `rko bench alignment` that share the pretrained
    model, its labelled rollouts and every setting (methods, label counts or seeds split over
    processes or machines, each on its own copy of the bench folder). A run of the same method,
    label count and seed found twice must have the same numbers. Raises RkoError naming what differs."""
    if not results:
        raise RkoError('nothing to merge')
    first = results[0]
    for i, other in enumerate(results, start=1):
        if other.get('bench') != 'alignment' or 'runs' not in other:
            raise RkoError(f'result {i} is not an alignment bench result')
        keys = (set(first) | set(other)) - set(_MERGED_KEYS)
        differ = sorted(k for k in keys if _setting(first, k) != _setting(other, k))
        if differ:
            shown = ', '.join(f'{k} ({_setting(first, k)!r} / {_setting(other, k)!r})'
                              for k in differ[:4])
            raise RkoError(f'result {i} is not from the same pretrained model and settings as '
                           f'result 1: {shown}{" ..." if len(differ) > 4 else ""}')
    runs, seen = [], {}
    for result in results:
        for run in result['runs']:
            key = (run['method'], run['labels'], run['seed'])
            if key in seen:
                if _numbers(seen[key]) != _numbers(run):
                    raise RkoError(f'{key[0]} at {key[1]} labels, seed {key[2]}, is in two results '
                                   'with different numbers: not one setting (was the code changed '
                                   'between them?)')
                continue
            seen[key] = run
            runs.append(run)
    methods = list(dict.fromkeys(m for r in results for m in r['methods']))
    label_counts = sorted({int(n) for r in results for n in r['labels']})
    merged = {k: v for k, v in first.items() if k not in _MERGED_KEYS}
    runs.sort(key=lambda r: (r['labels'], methods.index(r['method']), r['seed']))
    table = summarize_runs(runs, methods, label_counts, first['eval_episodes'])
    per_cell = {}
    for r in runs:
        per_cell.setdefault((r['method'], r['labels']), set()).add(r['seed'])
    merged.update(methods=methods, labels=label_counts, seeds=max(map(len, per_cell.values())),
                  table=table, **leads(table, methods, label_counts), runs=runs)
    if plot_path:
        merged['plot'] = _plot(merged, plot_path)
    return merged


def _numbers(run):
    """A run row without its model version's name (a rerun in another store is named anew)."""
    return {k: v for k, v in run.items() if k != 'version'}


def standard_error(runs, episodes_per_run):
    """Standard error of the mean success over fine-tuning seeds: the larger of the binomial one
    (all evaluation episodes pooled; the rate kept half an episode from 0 and 1) and the spread
    of the seeds (std / sqrt(seeds), two or more seeds). None without runs."""
    if not runs:
        return None
    n = len(runs) * int(episodes_per_run)
    binomial = binomial_standard_error(np.clip(np.mean(runs), 0.5 / n, 1.0 - 0.5 / n), n, worst=False)
    seeds = float(np.std(runs, ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else 0.0
    return max(binomial, seeds)


def ahead_of(table, methods, labels):
    """(methods rko's mean success beats at `labels`, those it beats by more than two standard
    errors of the difference): the first is the raw order, the second what the runs can tell."""
    rko = table.get('rko', {}).get(labels)
    if rko is None or rko['preferred_success_mean'] is None:
        return [], []
    ahead, clearly = [], []
    for m in methods:
        other = table[m][labels]
        if m == 'rko' or other['preferred_success_mean'] is None:
            continue
        gap = rko['preferred_success_mean'] - other['preferred_success_mean']
        if gap > 0:
            ahead.append(m)
            if gap > 2.0 * np.hypot(rko['preferred_success_se'], other['preferred_success_se']):
                clearly.append(m)
    return ahead, clearly


def _mean_of(rows, key):
    """Mean of `key` over the rows that have it, None if none does."""
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else None


def _plot(result, path):
    """Preferred-style success (+- one standard error) by method: one line per method over the
    label counts, or one bar per method when there is a single count (a line plot of one x
    stacks every method on the same spot)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    single = len(result['labels']) == 1
    for i, method in enumerate(result['methods']):
        cells = [result['table'][method][str(n)] for n in result['labels']]
        ys = [np.nan if c['preferred_success_mean'] is None else c['preferred_success_mean']
              for c in cells]
        errors = [c.get('preferred_success_se') or 0.0 for c in cells]   # one standard error
        if single:
            ax.bar(i, ys[0], yerr=errors[0], capsize=4, color=f'C{i}', label=method)
        else:
            ax.errorbar(result['labels'], ys, yerr=errors, fmt='o-', capsize=3, label=method)
    base = result['pretrained']['preferred_success']
    ax.axhline(base, color='grey', ls=':', label='pretrained')
    ax.axhline(0.9, color='k', lw=0.8, ls='--')
    if single:
        ax.text(len(result['methods']) - 0.5, base + 0.01, f'pretrained {base:.0%}', ha='right',
                va='bottom', color='dimgrey', fontsize=8,
                bbox={'facecolor': 'white', 'edgecolor': 'none', 'pad': 1})
        ax.set_xticks(range(len(result['methods'])), result['methods'])
        ax.set_xlabel(f'method, {result["labels"][0]} labelled episodes, '
                      f'{result.get("seeds", 1)} seed(s)')
    else:
        ax.set_xlabel('labelled episodes')
        ax.legend()
    ax.set_ylabel('preferred-style success (+- 1 s.e.)')
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
