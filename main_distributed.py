# SLURM launcher through submitit, with ijepa's arguments:
#   python main_distributed.py --fname configs/in1k_vith14_ep300.yaml --folder $path_to_save_submitit_logs \
#       --partition $slurm_partition --nodes 16 --tasks-per-node 8 --time 1000
# Several configs at once (--fname is then a yaml file holding a list of config paths):
#   python main_distributed.py --batch-launch --fname configs/batch.yaml --folder ... --partition ...
# Without SLURM (or with --cluster local) the same job runs on this machine through submitit's local executor,
# one process per task, e.g. two CPU processes:
#   python main_distributed.py --fname configs/demo/fmnist_vitnano_ijepa.yaml --folder logs/submitit \
#       --cluster local --tasks-per-node 2 --gpus-per-node 0 --wait
#
# Every config is validated before anything is submitted, so a typo fails here and not on the cluster.
# Rank and world size come from submitit's job environment. On timeout or preemption, submitit calls
# Trainer.checkpoint(): the job is requeued (up to 20 times on SLURM) and resumes from
# {logging.folder}/{write_tag}-latest.pth.tar. That file is refreshed at the end of every epoch and, with
# logging.checkpoint_steps, every that many steps: set it for long epochs.

import argparse
import logging
import os
import pprint
import sys

import cloudpickle   # submitit's pickler
import submitit
import yaml

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
logger = logging.getLogger()

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
if __name__ != '__main__':
    # Trainer may be submitted from code that imported this file: pickle it by value, so that the job does not
    # need to import this module (it may start outside the repository); run as a script, that is the default.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

parser = argparse.ArgumentParser(description='Launch I-JEPA / DSeq-JEPA pretraining through submitit (SLURM).')
parser.add_argument('--folder', type=str, default='logs/submitit',
                    help='location to save submitit logs (one job_<id> folder per job)')
parser.add_argument('--batch-launch', action='store_true',
                    help='whether fname points to a file to batch-launch several config files')
parser.add_argument('--fname', type=str, default='configs.yaml',
                    help='config file to launch (with --batch-launch: yaml file listing config files)')
parser.add_argument('--partition', type=str, default=None, help='cluster partition to submit jobs on')
parser.add_argument('--nodes', type=int, default=1, help='num. nodes to request for job')
parser.add_argument('--tasks-per-node', type=int, default=1, help='num. procs per node (one per GPU)')
parser.add_argument('--time', type=int, default=4300, help='time in minutes to run job')
# -- added by this project
parser.add_argument('--cluster', type=str, default=None, choices=['slurm', 'local', 'debug'],
                    help='submitit executor: default slurm when available, else local (processes on this '
                         'machine); debug runs one task in this process (implies --wait)')
parser.add_argument('--gpus-per-node', type=int, default=None,
                    help='GPUs per node (default: --tasks-per-node; on the local executor without CUDA: 0)')
parser.add_argument('--cpus-per-task', type=int, default=10, help='CPU cores per task')
parser.add_argument('--mem-per-gpu', type=str, default='55G', help="SLURM memory per GPU, e.g. '55G'")
parser.add_argument('--account', type=str, default=None, help='SLURM account')
parser.add_argument('--qos', type=str, default=None, help='SLURM quality of service')
parser.add_argument('--constraint', type=str, default=None, help='SLURM node constraint')
parser.add_argument('--job-name', type=str, default=None, help='job name (default: submitit)')
parser.add_argument('--wait', action='store_true',
                    help='wait for the jobs to end; exit code non-zero if one failed')


def _cpu_threads(local_world_size):
    """Threads for one CPU process: its SLURM allocation, or this machine's cores shared by its local tasks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    per_task = os.environ.get('SLURM_CPUS_PER_TASK')
    if per_task:
        return max(1, min(cores, int(per_task)))
    return max(1, cores // max(1, local_world_size))


class Trainer:
    """The submitted callable: one call per task. Checkpointable: on timeout/preemption submitit pickles
    `self.checkpoint()` and requeues it, and the new job resumes from the latest checkpoint.

    Signature compatible with ijepa's `Trainer(fname, load_model)` (the second argument means resume).
    """

    def __init__(self, fname='configs.yaml', resume=False):
        self.fname = os.path.abspath(fname)
        self.resume = bool(resume)
        self.code_dir = CODE_DIR

    def __call__(self):
        if self.code_dir not in sys.path:      # the job may not start in the repository
            sys.path.insert(0, self.code_dir)
        logging.getLogger('submitit').propagate = False   # it has its own handler: no duplicated lines
        import torch
        import torch.distributed as dist

        from src.config import load_config
        from src.train import main as app_main
        from src.utils.distributed import init_distributed

        # -- rank and world size from submitit's job environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK)
        try:
            job_env = submitit.JobEnvironment()
        except RuntimeError:                    # called outside a submitit job: one process, or torchrun's env
            job_env = None
        if job_env is not None:
            env = submitit.helpers.TorchDistributedEnvironment()
            if job_env.num_nodes == 1:
                env.master_addr = '127.0.0.1'   # one node: no need to resolve the host name
            env.export(set_cuda_visible_devices=False, overwrite=True)
            local_rank, local_world_size = env.local_rank, env.local_world_size
            logger.info(f'{job_env}: rank {env.rank} of {env.world_size}, master {env.master_addr}:{env.master_port}')
        else:
            local_rank = int(os.environ.get('LOCAL_RANK', 0))
            local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', 1))

        # -- device: this task's GPU, else the CPU with this task's share of the cores
        if torch.cuda.is_available():
            device = torch.device('cuda', local_rank % torch.cuda.device_count())
        else:
            device = torch.device('cpu')
            torch.set_num_threads(_cpu_threads(local_world_size))

        logger.info(f'called-params {self.fname} (resume: {self.resume})')
        cfg = load_config(self.fname)
        world_size, rank = init_distributed()
        if rank == 0:
            logger.info('loaded params...\n' + pprint.pformat(cfg.to_dict(), indent=4))
        logger.info(f'Running... (rank: {rank}/{world_size}, device: {device})')
        try:
            return app_main(args=cfg, resume_preempt=self.resume, device=device)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on timeout/preemption: requeue a Trainer that resumes from the latest checkpoint."""
        return submitit.helpers.DelayedSubmission(Trainer(self.fname, resume=True))


def config_fnames(args):
    """The config files to launch: --fname, or with --batch-launch the list held in --fname."""
    if not args.batch_launch:
        return [args.fname]
    try:
        with open(args.fname, 'r') as f:
            fnames = yaml.safe_load(f)
    except FileNotFoundError:
        raise SystemExit(f'error: batch file not found: {args.fname}')
    if not isinstance(fnames, list) or not fnames or not all(isinstance(f, str) for f in fnames):
        raise SystemExit(f'error: {args.fname}: --batch-launch expects a yaml list of config files, got {fnames!r}')
    return fnames


def validate(fnames):
    """Load every config as the job will (unknown keys, types, mask settings): errors name the file and the key.
    A data set missing here only warns: it may exist on the cluster's nodes alone."""
    sys.path.insert(0, CODE_DIR)
    from src.config import ConfigError, load_config
    from src.datasets import missing_data
    from src.train import preflight
    outputs = {}                  # (logging.folder, write_tag) -> the config writing there
    for fname in fnames:
        try:
            cfg = load_config(fname)
        except ConfigError as e:
            raise SystemExit(f'error: {e}')
        where = (os.path.realpath(cfg.logging.folder), cfg.logging.write_tag)
        if where in outputs:      # the jobs run at once: one CSV, one checkpoint, two runs
            raise SystemExit(f'error: {outputs[where]} and {fname} both write to logging.folder={cfg.logging.folder} '
                             f'(write_tag {cfg.logging.write_tag}): give each its own folder')
        outputs[where] = fname
        try:
            preflight(cfg, check_data=False)
        except ConfigError as e:
            raise SystemExit(f'error: {fname}: {e}')
        problem = missing_data(cfg.data)
        if problem:
            print(f'warning: {fname}: {problem}, on this machine; the job fails unless the nodes have it',
                  file=sys.stderr)


def make_executor(args):
    executor = submitit.AutoExecutor(folder=os.path.join(args.folder, 'job_%j'), cluster=args.cluster,
                                     slurm_max_num_timeout=20)
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = args.tasks_per_node
        if executor.cluster != 'slurm':
            import torch
            gpus = min(gpus, torch.cuda.device_count())
    slurm = dict(slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
                 slurm_constraint=args.constraint)
    if gpus > 0:
        slurm['slurm_mem_per_gpu'] = args.mem_per_gpu
    executor.update_parameters(
        name=args.job_name,
        timeout_min=args.time,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        gpus_per_node=gpus,
        **{k: v for k, v in slurm.items() if v is not None})
    return executor


def launch(args):
    fnames = config_fnames(args)
    validate(fnames)
    cluster = args.cluster or submitit.AutoExecutor.which()     # what submitit would use here
    if args.nodes > 1 and cluster in ('local', 'debug'):
        raise SystemExit(f'error: --cluster {cluster} runs on one node (got --nodes {args.nodes})'
                         + ('' if args.cluster else ': submitit found no SLURM here (run this on a SLURM login '
                                                    'node, or use --nodes 1 to run on this machine)'))
    if args.cluster == 'debug' and args.tasks_per_node > 1:
        raise SystemExit('error: --cluster debug runs one task in this process: use --tasks-per-node 1, or '
                         '--cluster local for several processes')
    executor = make_executor(args)

    jobs = []
    with executor.batch():
        for fname in fnames:
            jobs.append(executor.submit(Trainer(fname)))
    for fname, job in zip(fnames, jobs):
        print(job.job_id, flush=True)
        logger.info(f'submitted {fname} as job {job.job_id} ({executor.cluster}); logs: {job.paths.folder}')

    if not args.wait and executor.cluster != 'debug':   # a debug job runs in this process when waited for
        return 0
    failed = 0
    for fname, job in zip(fnames, jobs):
        try:
            job.results()
            logger.info(f'job {job.job_id} ({fname}) finished')
        except Exception as e:   # submitit re-raises the job's error with its traceback and log paths
            failed += 1
            print(f'error: job {job.job_id} ({fname}) failed: {e}', file=sys.stderr, flush=True)
    return 1 if failed else 0


def main(argv=None):
    args = parser.parse_args(argv)
    return launch(args)


if __name__ == '__main__':
    sys.exit(main())
