# Evaluate a pretrained encoder on this machine (frozen-encoder probes; see evals/scaffold.py):
#   python -m evals.main --fname configs/evals/fmnist_demo.yaml --devices cpu
#   python -m evals.main --fname configs/evals/fmnist_demo.yaml --checkpoint logs/demo_dseq/jepa-latest.pth.tar
# Feature extraction and the probes run in one process on the first device.

import argparse
import logging
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Frozen-encoder evaluation (k-NN, linear and attentive probes).')
    parser.add_argument('--fname', required=True, help='evaluation config (configs/evals/*.yaml)')
    parser.add_argument('--devices', nargs='+', default=['cpu'], help='device to run on (the first is used)')
    parser.add_argument('--checkpoint', default=None, help='override pretrain.checkpoint')
    parser.add_argument('--random-init', action='store_true',
                        help='evaluate a randomly initialised encoder of the same architecture (a baseline)')
    parser.add_argument('--folder', default=None, help='override logging.folder')
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
    try:
        cfg = load_eval_config(args.fname, overrides)
        if args.random_init:
            cfg = random_init_config(cfg)
    except ConfigError as e:
        raise SystemExit(f'error: {e}')
    from evals.scaffold import run
    try:
        results = run(cfg, device=args.devices[0])
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e}')
    for r in results:
        print(f'{r["eval"]}: top-1 {r["top1"]:.2f}%')
    return 0


def random_init_config(cfg):
    """The same evaluation on a randomly initialised encoder of the checkpoint's architecture."""
    import dataclasses
    from src.helper import load_encoder
    _, info = load_encoder(cfg.pretrain.checkpoint, which=cfg.pretrain.which, model_name=cfg.pretrain.model_name,
                           patch_size=cfg.pretrain.patch_size, crop_size=cfg.pretrain.crop_size,
                           use_cls_token=cfg.pretrain.use_cls_token)
    pretrain = dataclasses.replace(cfg.pretrain, checkpoint=None, model_name=info['model_name'],
                                   patch_size=info['patch_size'], crop_size=info['crop_size'],
                                   use_cls_token=info['use_cls_token'])
    data = dataclasses.replace(cfg.data, normalization=cfg.data.normalization or info['normalization'])
    return dataclasses.replace(cfg, pretrain=pretrain, data=data)


if __name__ == '__main__':
    sys.exit(main())
