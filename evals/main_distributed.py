# Evaluations through submitit (SLURM), one job per eval config, one GPU each:
#   python -m evals.main_distributed --fname configs/evals/in1k_vitb16_linear.yaml --folder $LOGS/submitit \
#       --partition $PARTITION --checkpoint $RUN/jepa-latest.pth.tar
# Several eval configs at once: --fname A.yaml B.yaml ... Without SLURM (or with --cluster local) the jobs run on
# this machine through submitit's local executor; --cluster debug runs them in this process.
# Every config is validated before anything is submitted. On timeout or preemption the job is requeued and runs
# again; the features it had extracted are read back from the cache.

import argparse
import logging
import os
import sys

import submitit

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
logger = logging.getLogger()

CODE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EvalJob:
    """The submitted callable; checkpointable: a requeued job runs the evaluations again (cached features)."""

    def __init__(self, fname, overrides=None):
        self.fname = os.path.abspath(fname)
        self.overrides = dict(overrides or {})

    def __call__(self):
        if CODE_DIR not in sys.path:
            sys.path.insert(0, CODE_DIR)
        logging.getLogger('submitit').propagate = False
        import torch

        from evals.config import load_eval_config
        from evals.scaffold import run
        device = 'cuda:0' if torch.cuda.is_available() else 'cpu'
        cfg = load_eval_config(self.fname, self.overrides)
        return run(cfg, device)

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(EvalJob(self.fname, self.overrides))


def main(argv=None):
    parser = argparse.ArgumentParser(description='Launch evaluations through submitit.')
    parser.add_argument('--fname', nargs='+', required=True, help='evaluation config(s)')
    parser.add_argument('--checkpoint', default=None, help='override pretrain.checkpoint in every config')
    parser.add_argument('--folder', default='logs/submitit_evals', help='submitit logs (one job_<id> per job)')
    parser.add_argument('--partition', default=None)
    parser.add_argument('--account', default=None)
    parser.add_argument('--qos', default=None)
    parser.add_argument('--time', type=int, default=600, help='minutes')
    parser.add_argument('--cpus-per-task', type=int, default=10)
    parser.add_argument('--gpus', type=int, default=None, help='GPUs per job (default: 1 on SLURM, else 0)')
    parser.add_argument('--cluster', default=None, choices=['slurm', 'local', 'debug'])
    parser.add_argument('--wait', action='store_true', help='wait for the jobs; non-zero exit if one failed')
    args = parser.parse_args(argv)

    sys.path.insert(0, CODE_DIR)
    from evals.config import load_eval_config
    from src.config import ConfigError
    overrides = {'pretrain.checkpoint': args.checkpoint} if args.checkpoint else {}
    for fname in args.fname:
        try:
            cfg = load_eval_config(fname, overrides)
        except ConfigError as e:
            raise SystemExit(f'error: {e}')
        if cfg.pretrain.checkpoint and not os.path.isfile(cfg.pretrain.checkpoint):
            print(f'warning: {fname}: checkpoint {cfg.pretrain.checkpoint} not found on this machine; the job fails '
                  'unless the nodes have it', file=sys.stderr)
    executor = submitit.AutoExecutor(folder=os.path.join(args.folder, 'job_%j'), cluster=args.cluster,
                                     slurm_max_num_timeout=5)
    gpus = args.gpus if args.gpus is not None else (1 if executor.cluster == 'slurm' else 0)
    slurm = {k: v for k, v in dict(slurm_partition=args.partition, slurm_account=args.account,
                                   slurm_qos=args.qos).items() if v is not None}
    executor.update_parameters(timeout_min=args.time, nodes=1, tasks_per_node=1, cpus_per_task=args.cpus_per_task,
                               gpus_per_node=gpus, **slurm)
    jobs = [executor.submit(EvalJob(fname, overrides)) for fname in args.fname]
    for fname, job in zip(args.fname, jobs):
        print(job.job_id, flush=True)
        logger.info(f'submitted {fname} as job {job.job_id} ({executor.cluster}); logs: {job.paths.folder}')
    if not args.wait and executor.cluster != 'debug':
        return 0
    failed = 0
    for fname, job in zip(args.fname, jobs):
        try:
            for r in job.results()[0]:
                print(f'{fname}: {r["eval"]}: top-1 {r["top1"]:.2f}%', flush=True)
        except Exception as e:
            failed += 1
            print(f'error: job {job.job_id} ({fname}) failed: {e}', file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
