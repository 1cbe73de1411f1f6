# A/B comparison of pretraining runs (e.g. I-JEPA against DSeq-JEPA, several seeds each):
#
#   python -m evals.ab --fname configs/evals/fmnist_demo.yaml \
#       --group ijepa logs/ab/ijepa_s0 logs/ab/ijepa_s1 logs/ab/ijepa_s2 \
#       --group dseq logs/ab/dseq_s0 logs/ab/dseq_s1 logs/ab/dseq_s2 --out logs/ab/report
#
# Each run folder is evaluated with the eval config on its latest checkpoint, unless {run}/evals/ already holds
# results of the same eval config on that same checkpoint file (the demos write them when training ends). Writes
#   ab.md / ab.csv   per evaluation: mean +- std over the seeds of each group, and each group's difference from the
#                    first group with a 95% Welch t confidence interval; the steps the checkpoints trained for (the
#                    seeds of a group must agree; groups that differ are warned about)
#   ab.png           training loss against step (per step, mean and min-max over the seeds that logged it) and the
#                    probe's test accuracy against probe epoch, per group

import argparse
import csv
import json
import logging
import math
import os
import statistics
import sys

logger = logging.getLogger()


def checkpoint_of(run, tag='jepa'):
    from src.helper import latest_checkpoint
    return latest_checkpoint(run, tag)


def step_and_seed(run, tag='jepa'):
    """(training step, meta.seed or None) of a run's latest checkpoint, memory-mapped (the weights are not read);
    the step is 'epoch N' for ijepa's checkpoints, which record only the epoch."""
    from src.helper import torch_load
    checkpoint = torch_load(checkpoint_of(run, tag), mmap=True)
    step = checkpoint['step'] if 'step' in checkpoint else f'epoch {checkpoint.get("epoch")}'
    return step, (checkpoint.get('config') or {}).get('meta', {}).get('seed')


def run_results(run, fname, tag='jepa', device='cpu'):
    """The evaluation results of one run folder: read from {run}/evals/evals.json when they cover the config's
    evaluations of the run's latest checkpoint, computed (and written there) otherwise."""
    from evals.config import load_eval_config
    from evals.scaffold import run as evaluate
    checkpoint = checkpoint_of(run, tag)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'{run}: no {tag}-latest.pth.tar (is it a training folder?)')
    folder = os.path.join(run, 'evals')
    cfg = load_eval_config(fname, {'pretrain.checkpoint': checkpoint, 'logging.folder': folder})
    cached = os.path.join(folder, f'{cfg.logging.write_tag}.json')
    if os.path.isfile(cached):
        from evals.scaffold import signature
        with open(cached) as f:
            results = json.load(f)
        by_eval = {r['eval']: r for r in results}
        expected = signature(cfg)     # the same eval config on the same checkpoint file, else evaluate again
        if all(e in by_eval and by_eval[e].get('signature') == expected for e in cfg.evals):
            logger.info(f'{run}: results read from {cached}')
            return [by_eval[e] for e in cfg.evals]
    return evaluate(cfg, device)


def t_quantile(df, q=0.975):
    from scipy.stats import t
    return float(t.ppf(q, df))


def compare(groups):
    """groups: {name: {eval: [top1 per seed]}} (first group = reference). Returns table rows."""
    names = list(groups)
    evals = [e for e in groups[names[0]] if all(e in groups[n] for n in names)]
    rows = []
    for e in evals:
        ref = groups[names[0]][e]
        for name in names:
            x = groups[name][e]
            row = {'eval': e, 'group': name, 'n': len(x), 'mean': statistics.mean(x),
                   'std': statistics.stdev(x) if len(x) > 1 else float('nan')}
            if name != names[0]:
                diff = row['mean'] - statistics.mean(ref)
                va, vb = (statistics.variance(ref) if len(ref) > 1 else float('nan'),
                          row['std'] ** 2)
                se2 = va / len(ref) + vb / len(x)
                if se2 > 0 and not math.isnan(se2):
                    df = se2 ** 2 / ((va / len(ref)) ** 2 / (len(ref) - 1) + (vb / len(x)) ** 2 / (len(x) - 1))
                    half = t_quantile(df) * math.sqrt(se2)
                else:     # no spread within either group (e.g. identical runs): no interval to give
                    half = float('nan')
                row.update(diff=diff, ci_low=diff - half, ci_high=diff + half)
            rows.append(row)
    return rows


def write_table(rows, reference, out):
    os.makedirs(out, exist_ok=True)
    columns = ('eval', 'group', 'n', 'step', 'mean', 'std', 'diff', 'ci_low', 'ci_high')
    with open(os.path.join(out, 'ab.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    lines = [f'| evaluation | group | seeds | steps | top-1 (%) mean +- std | difference vs {reference} [95% CI] |',
             '| --- | --- | --- | --- | --- | --- |']
    for r in rows:
        diff = ('' if 'diff' not in r else
                f'{r["diff"]:+.2f} [{r["ci_low"]:+.2f}, {r["ci_high"]:+.2f}]')
        lines.append(f'| {r["eval"]} | {r["group"]} | {r["n"]} | {r.get("step", "")} | {r["mean"]:.2f} +- '
                     f'{r["std"]:.2f} | {diff} |')
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(out, 'ab.md'), 'w') as f:
        f.write(text)
    return text


def loss_csv(run, tag='jepa'):
    return os.path.join(run, f'{tag}_r0.csv')


def read_losses(run, tag='jepa'):
    """(steps, losses) from the rank-0 training CSV of a run. A row's step is (epoch - 1) * I + itr, with I the
    largest itr in the file + 1: the iterations per epoch when each epoch's last step is logged, as this
    repository's and ijepa's CSVs log every step (a sparser log gives approximate steps)."""
    rows = []
    with open(loss_csv(run, tag)) as f:
        for r in csv.DictReader(f):
            try:
                if None in r.values():           # fewer fields than the header
                    raise ValueError
                rows.append((int(r['epoch']), int(r['itr']), float(r['loss'])))
            except ValueError:                   # a row cut short by a kill (training drops it when it resumes)
                logger.warning(f'{loss_csv(run, tag)}: skipped the incomplete row {r}')
    per_epoch = max((itr for _, itr, _ in rows), default=0) + 1
    return [(epoch - 1) * per_epoch + itr for epoch, itr, _ in rows], [loss for _, _, loss in rows]


def plot(runs, results, out, probe='linear'):
    """ab.png: training loss (left) and the probe's test accuracy per epoch (right), mean and min-max per group."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_probe) = plt.subplots(1, 2, figsize=(11, 4))
    for name, folders in runs.items():
        by_step = {}                  # step -> the losses of the seeds that logged it (runs may differ in length)
        for steps, losses in (read_losses(r) for r in folders):
            for step, loss in zip(steps, losses):
                by_step.setdefault(step, []).append(loss)
        steps = sorted(by_step)
        ax_loss.plot(steps, [statistics.mean(by_step[s]) for s in steps], label=f'{name} ({len(folders)} seeds)')
        ax_loss.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], alpha=0.2)
        probe_curves = [next((r['curve'] for r in res if r['eval'] == probe and r.get('curve')), None)
                        for res in results[name]]
        probe_curves = [c for c in probe_curves if c]
        if probe_curves:
            n = min(len(c) for c in probe_curves)
            epochs = range(1, n + 1)
            ax_probe.plot(epochs, [statistics.mean(c[i] for c in probe_curves) for i in range(n)], label=name)
            ax_probe.fill_between(epochs, [min(c[i] for c in probe_curves) for i in range(n)],
                                  [max(c[i] for c in probe_curves) for i in range(n)], alpha=0.2)
    ax_loss.set(xlabel='training step', ylabel='training loss', yscale='log', title='pretraining loss')
    ax_probe.set(xlabel='probe epoch', ylabel='test top-1 (%)', title=f'{probe} probe')
    for ax in (ax_loss, ax_probe):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, 'ab.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description='Compare groups of pretraining runs (mean +- std over seeds).')
    parser.add_argument('--fname', required=True, help='evaluation config (configs/evals/*.yaml)')
    parser.add_argument('--group', nargs='+', action='append', required=True, metavar=('NAME', 'RUN'),
                        help='a group name then its run folders (one per seed); the first group is the reference')
    parser.add_argument('--out', required=True, help='folder for ab.md, ab.csv and ab.png')
    parser.add_argument('--devices', nargs='+', default=['cpu'])
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    runs = {}
    for group in args.group:
        if len(group) < 2:
            raise SystemExit(f'error: --group {group[0]}: give the group name, then at least one run folder')
        if group[0] in runs:
            raise SystemExit(f'error: two groups are named {group[0]!r}')
        runs[group[0]] = group[1:]
    if len(runs) < 2:
        raise SystemExit('error: give at least two --group')
    for run in (r for folders in runs.values() for r in folders):
        for path, what in ((checkpoint_of(run), 'is it a training folder?'), (loss_csv(run), 'the training log')):
            if not os.path.isfile(path):
                raise SystemExit(f'error: {run}: no {os.path.basename(path)} ({what})')
    where = {}
    for name, folders in runs.items():
        for run in folders:
            if os.path.realpath(run) in where:
                raise SystemExit(f'error: {run} is given twice ({where[os.path.realpath(run)]} and {name}): '
                                 'each seed is one run folder')
            where[os.path.realpath(run)] = name
    facts = {name: [step_and_seed(r) for r in folders] for name, folders in runs.items()}
    steps = {name: sorted({step for step, _ in found}, key=str) for name, found in facts.items()}
    for name, found in facts.items():   # this repository's runs are reproducible: one seed twice is one run twice
        seeds = [seed for _, seed in found if seed is not None]
        if len(set(seeds)) < len(seeds):
            logger.warning(f'group {name}: runs share meta.seed ({seeds}); identical configs train identical '
                           'runs, which are not independent seeds')
    for name, found in steps.items():    # seeds of one group averaged together must have trained as long
        if len(found) > 1:
            raise SystemExit(f'error: group {name} mixes checkpoints of different training steps {found}: give runs '
                             'that trained for the same number of steps')
    if len({tuple(found) for found in steps.values()}) > 1:
        logger.warning('the groups trained for different numbers of steps: ' +
                       ', '.join(f'{name} {found}' for name, found in steps.items()))
    from src.config import ConfigError
    try:
        results = {name: [run_results(r, args.fname, device=args.devices[0]) for r in folders]
                   for name, folders in runs.items()}
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    groups = {name: {} for name in runs}
    for name, per_run in results.items():
        for res in per_run:
            for r in res:
                groups[name].setdefault(r['eval'], []).append(r['top1'])
    rows = compare(groups)
    for row in rows:
        row['step'] = steps[row['group']][0]        # the checkpoints' training step (the same within a group)
    print(write_table(rows, next(iter(runs)), args.out), end='')
    print(f'wrote {os.path.join(args.out, "ab.md")}, ab.csv and {plot(runs, results, args.out)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
