# Local launcher: one training process per --devices entry on this machine.
#   python main.py --fname configs/demo/fmnist_vitnano_ijepa.yaml --devices cpu
#   python main.py --fname configs/in1k_vith14_ep300.yaml --devices cuda:0 cuda:1
#   python main.py --fname configs/demo/fmnist_vitnano_dseq.yaml --devices cpu --set meta.seed=1 logging.folder=logs/s1
# Several devices use torch.distributed (gloo on CPU, NCCL on CUDA) on a free local port; an error in any process
# stops the others and makes the exit code non-zero, and the processes end with the launcher (e.g. on SIGTERM).

import argparse
import logging
import os
import pprint
import socket
import sys

import yaml

parser = argparse.ArgumentParser()
parser.add_argument('--fname', type=str, help='name of config file to load', default='configs.yaml')
parser.add_argument('--devices', type=str, nargs='+', default=['cuda:0'],
                    help='devices to use on this machine, one process each: cpu, or cuda:0 cuda:1 ...')
parser.add_argument('--set', type=str, nargs='+', default=[], metavar='SECTION.KEY=VALUE',
                    help='override config keys, e.g. --set meta.seed=1 logging.folder=logs/run1 (values are yaml)')


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def apply_overrides(params, overrides):
    """--set SECTION.KEY=VALUE entries (VALUE read as yaml) applied to the config dict."""
    from src.config import set_keys
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep or key.count('.') != 1:
            raise SystemExit(f'error: --set {item!r}: expected SECTION.KEY=VALUE, e.g. meta.seed=1')
        set_keys(params, {key: yaml.safe_load(value)})
    return params


def load_params(fname, overrides=()):
    from src.config import ConfigError, parse_config, read_config_file
    from src.train import preflight
    try:
        params = read_config_file(fname)
    except ConfigError as e:                # not found, or not a mapping: the message names the file
        raise SystemExit(f'error: {e}')
    try:
        params = apply_overrides(params, overrides)
        preflight(parse_config(params))    # keys, types, mask settings, data: before any process starts
    except ConfigError as e:
        raise SystemExit(f'error: {fname}: {e}')
    return params


def die_with(launcher_pid):
    """Linux: this process gets SIGTERM when the launcher ends, however it ends (SIGTERM, SIGKILL, a crash), so
    that no rank trains on unsupervised. Ctrl-C reaches every process of the group anyway."""
    if not sys.platform.startswith('linux'):
        return
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher_pid:     # the launcher ended before the line above
        os._exit(1)


def process_main(rank, fname, world_size, devices, port, overrides=(), launcher_pid=None):
    if launcher_pid is not None:
        die_with(launcher_pid)
    device = devices[rank]
    if device.startswith('cuda'):
        # one visible GPU per process, as in ijepa (set before anything in this process asks CUDA)
        os.environ['CUDA_VISIBLE_DEVICES'] = device.split(':')[-1] if ':' in device else '0'
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f'error: --devices {device}: no such CUDA device on this machine; use --devices cpu')
        device = 'cuda:0'
    else:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    logging.basicConfig(stream=sys.stdout, level=logging.INFO)
    logger = logging.getLogger()
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    logger.info(f'called-params {fname}')
    params = load_params(fname, overrides)
    if rank == 0:
        logger.info('loaded params...\n' + pprint.pformat(params, indent=4))
    # this launcher decides rank and world size: variables inherited from SLURM or torchrun must not (a single
    # process would wait for ranks that never come)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if world_size > 1:
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    from src.train import main as app_main
    from src.utils.distributed import init_distributed
    world_size, rank = init_distributed(rank_and_world_size=(rank, world_size))
    logger.info(f'Running... (rank: {rank}/{world_size})')
    try:
        app_main(args=params, device=device)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    args = parser.parse_args(argv)
    load_params(args.fname, args.set)
    devices = args.devices
    if len(devices) > 1 and any(d.startswith('cuda') for d in devices) and any(d == 'cpu' for d in devices):
        raise SystemExit('error: --devices mixes cpu and cuda')
    if len(devices) > 1 and devices[0].startswith('cuda'):   # (this process does not train: it may ask CUDA)
        import torch
        if torch.cuda.device_count() == 0:
            raise SystemExit(f'error: --devices {" ".join(devices)}: no CUDA device on this machine; use --devices cpu')
    if len(devices) == 1:
        process_main(0, args.fname, 1, devices, None, args.set)
        return 0
    import torch.multiprocessing as mp
    mp.start_processes(process_main, args=(args.fname, len(devices), devices, free_port(), args.set, os.getpid()),
                       nprocs=len(devices), join=True, start_method='spawn')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print('\ninterrupted: run the same command again to resume from the latest checkpoint '
              '(logging.folder/{write_tag}-latest.pth.tar)', file=sys.stderr)
        sys.exit(130)
