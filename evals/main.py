# Evaluate a pretrained encoder on this machine (frozen-encoder probes; see evals/scaffold.py):
#   python -m evals.main --fname configs/evals/fmnist_demo.yaml --devices cpu
#   python -m evals.main --fname configs/evals/fmnist_demo.yaml --checkpoint logs/demo_dseq/jepa-latest.pth.tar
# Feature extraction and the probes run in one process on the first device. Results go to --folder, else to the
# evals/ folder beside --checkpoint (where training writes its own evaluation), else to the config's
# logging.folder; without --folder, a --random-init baseline goes to random_init/ inside that folder (as training
# writes it), not over the checkpoint's results.

import argparse
import logging
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Frozen-encoder evaluation (k-NN, linear and attentive probes).')
    parser.add_argument('--fname', required=True, help='evaluation config (configs/evals/*.yaml)')
    parser.add_argument('--devices', nargs='+', default=['cpu'], help='device to run on (the first is used)')
    parser.add_argument('--checkpoint', default=None, help='override pretrain.checkpoint')
    parser.add_argument('--random-init', action='store_true',
                        help='evaluate a randomly initialised encoder of the same architecture (a baseline)')
    parser.add_argument('--folder', default=None,
                        help='override logging.folder (default with --checkpoint: evals/ beside the checkpoint)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    from evals.config import load_eval_config
    from src.config import ConfigError
    overrides = {}
    if args.checkpoint:
        overrides['pretrain.checkpoint'] = args.checkpoint
    if args.folder:
        overrides['logging.folder'] = args.folder
    elif args.checkpoint:               # beside the run, not in the folder the config names for another one
        overrides['logging.folder'] = os.path.join(os.path.dirname(args.checkpoint), 'evals')
    from evals.scaffold import random_init_config, run
    try:
        cfg = load_eval_config(args.fname, overrides)
        if args.random_init:
            cfg = random_init_config(cfg, subfolder=not args.folder)     # an explicit --folder is used as given
    except (ConfigError, FileNotFoundError, ValueError) as e:   # bad config, missing or unusable checkpoint
        raise SystemExit(f'error: {e}')
    try:
        results = run(cfg, device=args.devices[0])
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e}')
    for r in results:
        print(f'{r["eval"]}: top-1 {r["top1"]:.2f}%')
    return 0


if __name__ == '__main__':
    sys.exit(main())
