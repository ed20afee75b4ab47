"""Human-readable output of the demo and the alignment bench: tables, a PNG plot, rendered frames."""
import json
import os

import numpy as np


def _pct(x):
    return f'{100 * x:5.1f}%'


def binomial_standard_error(rate, n, worst=True):
    """Binomial standard error of a success rate over n episodes (at 50% when `worst`)."""
    p = 0.5 if worst else float(rate)
    return (p * (1.0 - p) / max(int(n), 1)) ** 0.5


def demo_table(summary):
    b, a = summary['before'], summary['after']
    lines = [
        '',
        f"rko_ros demo: simulated cloth, operator prefers '{summary['preferred_style']}', "
        f"method {summary['method']}",
        f"  {summary['labelled_episodes']} labelled episodes ({summary['desirable_labels']} desirable), "
        f"model {summary['pretrained_version']} -> {summary['aligned_version']}"
        + (f", policy noise scale {summary['noise_scale']:g}"
           if summary.get('noise_scale') is not None else '')
        + (f", chunks the most coherent of {summary['chunk_candidates']} draws"
           if (summary.get('chunk_candidates') or 1) > 1 else ''),
    ]
    rounds = summary.get('rounds') or []
    if len(rounds) > 1:
        for r in rounds:
            outcome = (f"-> {r['new_version']}" if r['new_version'] != r['model_version'] else
                       f"kept: {r['finetune_skipped'].split('. ')[0]}")
            plural = 's' if r['episodes'] != 1 else ''
            lines.append(f"    round {r['round']}: {r['episodes']} episode{plural} of {r['model_version']} "
                         f"labelled, {r['desirable']} desirable (preferred-style success "
                         f"{_pct(r['summary']['preferred_success']).strip()}), {outcome}")
    lines += [
        '',
        f"  {'':28}{'before':>10}{'after':>10}   (before: the pretrained model's labelled episodes)",
        f"  {'preferred-style success':28}{_pct(b['preferred_success']):>10}{_pct(a['preferred_success']):>10}",
        f"  {'preferred-style share':28}{_pct(b['preferred_style_share']):>10}{_pct(a['preferred_style_share']):>10}",
        f"  {'any-style success':28}{_pct(b['success_any_style']):>10}{_pct(a['success_any_style']):>10}",
        f"  {'mean fold quality':28}{b['mean_quality']:>10.3f}{a['mean_quality']:>10.3f}",
    ]
    if 'grasp_off_target_share' in b and 'grasp_off_target_share' in a:
        lines.append(f"  {'grasps off the grasp point':28}{_pct(b['grasp_off_target_share']):>10}"
                     f"{_pct(a['grasp_off_target_share']):>10}")
    lines += [
        f"  {'episodes':28}{b['episodes']:>10}{a['episodes']:>10}",
        '',
        f"  styles before: {b['style_counts']}",
        f"  styles after:  {a['style_counts']}",
        '',
        ('  target met: preferred-style success >= 90% with <= 20 labelled episodes'
         if summary.get('target_met') else
         f"  target NOT met: preferred-style success {_pct(a['preferred_success']).strip()} after "
         f"{summary['labelled_episodes']} labels (target >= 90% with <= 20)"),
        f"  one standard error of a rate over {a['episodes']} episodes: up to "
        f"{_pct(binomial_standard_error(a['preferred_success'], a['episodes'])).strip()} "
        f"(here {_pct(binomial_standard_error(a['preferred_success'], a['episodes'], worst=False)).strip()}); "
        f"fine-tuning seeds differ by about as much again",
        f"  report: {summary.get('report_dir', '')}   wall time {summary.get('wall_s', 0):.0f} s",
    ]
    if summary.get('stage_s'):
        lines.append('  time by stage: ' + ', '.join(
            f"{name.replace('_', ' ')} {seconds:.0f} s" for name, seconds in summary['stage_s'].items()))
    return '\n'.join(lines)


def _plot_before_after(path, summary):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = ['preferred_success', 'preferred_style_share', 'success_any_style', 'mean_quality']
    labels = ['preferred\nsuccess', 'preferred\nshare', 'any-style\nsuccess', 'mean\nquality']
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [summary['before'][k] for k in keys], 0.4, label=f"before ({summary['pretrained_version']})")
    ax.bar(x + 0.2, [summary['after'][k] for k in keys], 0.4, label=f"after ({summary['aligned_version']})")
    ax.axhline(0.9, color='k', lw=0.8, ls='--')
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{summary['method']} with {summary['labelled_episodes']} labelled episodes, "
                 f"preferred '{summary['preferred_style']}'")
    ax.legend(loc='upper left')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _render_frames(report_dir, cfg, version_dir, seeds, prefix):
    """A few frames of episodes of one model version, rendered at 640x480 (offline, ONNX Runtime)."""
    import cv2
    from rko_ros.demo.offline import evaluate_policy, runtime_predictor
    from rko_ros.policy.runtime import PolicyRuntime
    runtime = PolicyRuntime(version_dir)
    episodes = evaluate_policy(runtime_predictor(runtime), runtime.card, cfg.task_config(), seeds,
                               batch=len(seeds), extra_sizes=((480, 640),),
                               noise_scale=cfg.noise_scale, candidates=cfg.chunk_candidates)
    paths = []
    for i, episode in enumerate(episodes):
        frames = episode['frames']
        picks = [0, len(frames) // 3, 2 * len(frames) // 3, len(frames) - 1]
        strip = np.concatenate([frames[k] for k in picks], axis=1)
        path = os.path.join(report_dir, f'{prefix}_episode{i}_{episode["result"].style}.png')
        cv2.imwrite(path, cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def write_demo_report(cfg, summary, labelled, after):
    from rko_ros.demo.pipeline import as_jsonable, ensure_dir, seeds_for
    from rko_ros.policy.store import ModelStore
    report_dir = ensure_dir(os.path.join(cfg.data_dir, 'report'))
    _plot_before_after(os.path.join(report_dir, 'before_after.png'), summary)
    with open(os.path.join(report_dir, 'summary.json'), 'w') as f:
        json.dump(as_jsonable({'summary': summary, 'labelled': labelled, 'after': after}), f, indent=1)
    store = ModelStore(cfg.data_dir)
    seeds = seeds_for('bench', 2, cfg.seed)
    try:
        _render_frames(report_dir, cfg, store.version_dir(summary['pretrained_version']), seeds, 'before')
        _render_frames(report_dir, cfg, store.version_dir(summary['aligned_version']), seeds, 'after')
    except Exception as exc:  # frames are a courtesy: never lose the report over them
        with open(os.path.join(report_dir, 'frames_error.txt'), 'w') as f:
            f.write(repr(exc))
    return report_dir


def bench_table(result):
    per_cell = sorted({len(cell.get('preferred_success_runs', [])) for row in result['table'].values()
                       for cell in row.values()} - {0}) or [result['seeds']]
    seeds = str(per_cell[0]) if len(per_cell) == 1 else f'{per_cell[0]}-{per_cell[-1]}'
    lines = ['', f"rko bench alignment: preferred '{result['preferred_style']}', "
                 f"pretrained success {_pct(result['pretrained']['preferred_success']).strip()}, "
                 f"{seeds} seeds x {result['eval_episodes']} evaluation episodes", '']
    header = f"  {'method':8}" + ''.join(f"{f'{n} labels':>23}   " for n in result['labels'])
    lines += [header, '  ' + '-' * (len(header) - 2)]
    errors = []
    for method in result['methods']:
        row = f'  {method:8}'
        for n in result['labels']:
            cell = result['table'][method][str(n)]
            if cell['preferred_success_mean'] is None and not cell.get('errors'):
                row += f"{'not run':>10}{'':16}"      # a merge of runs that split the sweep
            elif cell['preferred_success_mean'] is None:
                row += f"{'failed':>10}{'':16}"
                errors += [f'{method} at {n} labels: {e}' for e in cell.get('errors', [])]
            else:
                se = cell.get('preferred_success_se')
                row += (f"{_pct(cell['preferred_success_mean']).strip():>10} "
                        f"q{cell['mean_quality_mean']:.2f}  "
                        + (f"+-{100 * se:4.1f}  " if se is not None else f"{'':8}"))
        lines.append(row)
    if errors:
        lines += [''] + [f'  {e}' for e in errors]
    lines += ['', '  cells: preferred-style success (mean over seeds), mean fold quality, one standard '
                  'error (points; binomial or the seeds\' spread, the larger)',
              f"  rko ahead of {', '.join(result['rko_ahead_of']) or 'none'} at the largest label "
              f"count; by more than two standard errors: "
              f"{', '.join(result.get('rko_ahead_beyond_two_se_of', [])) or 'none'}",
              *[f"    at {n} labels: ahead of {', '.join(lead['ahead_of']) or 'none'}; beyond two "
                f"standard errors: {', '.join(lead['beyond_two_se_of']) or 'none'}"
                for n, lead in result.get('rko_ahead_by_labels', {}).items()
                if len(result['labels']) > 1],
              f"  plot {result.get('plot', '')}"]
    return '\n'.join(lines)
