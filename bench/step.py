# Time the full training step of a config (forward, loss, backward, optimiser step, EMA), without data loading.
#
#   python -m bench.step --fname configs/in1k_vitl16_ijepa.yaml --batch-size 8 --steps 10
#   python -m bench.step --fname configs/bench/vit_tiny_224_ijepa.yaml --ijepa-ref /path/to/ijepa/checkout
#
# Batches (synthetic images, or real ones with --real-data, plus the config's masks) are prepared before timing.
# The step is src.train.TrainStep, exactly what training runs. With --ijepa-ref, facebookresearch/ijepa's own
# encoder and predictor are driven by the same step on the same batches, interleaved step by step with ours so
# that machine noise hits both alike, and the table shows the ratio. The last line is always
#   step_ms=<median ms of our step> images_per_s=<batch size * 1000 / step_ms>

import argparse
import copy
import importlib
import os
import statistics
import sys
import time

import torch

from src.config import load_config
from src.helper import init_model, init_opt
from src.objectives import make_objective, objective_class
from src.train import Schedules, TrainStep


def load_ijepa_vit(ijepa_dir):
    """Import ijepa's src.models.vision_transformer from a checkout without clashing with our `src` package."""
    ours = {k: m for k, m in sys.modules.items() if k == 'src' or k.startswith('src.')}
    for k in ours:
        del sys.modules[k]
    saved_path = list(sys.path)
    # ijepa's src has no __init__.py, so our regular package would win the import: hide it meanwhile
    sys.path[:] = [ijepa_dir] + [p for p in sys.path if not os.path.isfile(os.path.join(p or '.', 'src', '__init__.py'))]
    try:
        return importlib.import_module('src.models.vision_transformer')
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if k == 'src' or k.startswith('src.')]:
            del sys.modules[k]
        sys.modules.update(ours)


def make_batches(cfg, n, real_data):
    """n collated batches ((imgs, labels), masks...) made by the config's collator."""
    collator = objective_class(cfg).make_collator(cfg, rank=0)
    B, S = cfg.data.batch_size, cfg.data.crop_size
    if real_data:
        from src.datasets import make_dataset
        from src.transforms import make_transforms
        dataset = make_dataset(cfg.data, make_transforms(crop_size=S, crop_scale=cfg.data.crop_scale,
                                                         normalization=cfg.data.normalization))
        items = [dataset[i % len(dataset)] for i in range(n * B)]
    else:
        g = torch.Generator().manual_seed(0)
        items = [(torch.randn(3, S, S, generator=g), 0) for _ in range(n * B)]
    return [collator(items[i * B:(i + 1) * B]) for i in range(n)]


def build_step(cfg, device, encoder, predictor):
    target_encoder = copy.deepcopy(encoder)
    for p in target_encoder.parameters():
        p.requires_grad = False
    o = cfg.optimization
    ipe = 1000
    optimizer, scaler, _, _ = init_opt(encoder, predictor, iterations_per_epoch=ipe, start_lr=o.start_lr,
                                       ref_lr=o.lr, warmup=o.warmup, num_epochs=o.epochs, wd=o.weight_decay,
                                       final_wd=o.final_weight_decay, final_lr=o.final_lr,
                                       use_bfloat16=cfg.meta.use_bfloat16, ipe_scale=o.ipe_scale)
    use_bf16 = ((cfg.meta.use_bfloat16 and device.type == 'cuda')
                or (cfg.meta.bfloat16_on_cpu and device.type == 'cpu'))
    objective = make_objective(cfg, encoder, predictor, target_encoder)
    return TrainStep(objective, optimizer, scaler, Schedules(cfg, ipe), encoder, target_encoder, device, use_bf16)


def timed(step_fn, batch, step, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss, *_ = step_fn(batch, step)
    loss.item()                                   # waits for the step to finish
    return (time.perf_counter() - t0) * 1000.


def step_flops(step_fn, batch):
    """FLOPs of one step, counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step_fn(batch, 0)
    return counter.get_total_flops()


def matmul_gflops(device, n=2048, repeats=5):
    """The machine's fp32 matmul rate (GFLOP/s) on n x n matrices: the floor is step FLOPs / this rate."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float('inf')
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description='Time the full training step of a config.')
    parser.add_argument('--fname', required=True, help='config file')
    parser.add_argument('--steps', type=int, default=10, help='timed steps (after warm-up)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed warm-up steps')
    parser.add_argument('--batch-size', type=int, default=None, help='override data.batch_size')
    parser.add_argument('--devices', nargs='+', default=['cpu'], help='device to time on (the first is used)')
    parser.add_argument('--real-data', action='store_true', help="load the config's dataset instead of noise")
    parser.add_argument('--ijepa-ref', default=None, help='path to a facebookresearch/ijepa checkout: also time '
                        'its encoder and predictor in the same step')
    parser.add_argument('--vs', default=None, help='another config (e.g. the I-JEPA partner of a DSeq-JEPA config) '
                        'whose step is timed interleaved with this one, on its own batches of the same size')
    parser.add_argument('--dseq-lambda', type=float, default=1.0, help='DSeq-JEPA curriculum lambda held fixed '
                        'while timing (1: saliency regions, the steady state; 0: random boxes, the start)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: all cores)')
    parser.add_argument('--flops', action='store_true', help='also count the step FLOPs and compare the step time '
                        'with FLOPs / measured matmul rate')
    args = parser.parse_args(argv)

    cfg = load_config(args.fname)
    cfg.dseq.lambda_start = cfg.dseq.lambda_end = args.dseq_lambda
    if args.batch_size is not None:
        cfg.data.batch_size = args.batch_size
    device = torch.device(args.devices[0])
    if args.threads:
        torch.set_num_threads(args.threads)
    m = cfg.meta
    batches = make_batches(cfg, args.warmup + args.steps, args.real_data)

    torch.manual_seed(m.seed)
    encoder, predictor = init_model(device, patch_size=cfg.mask.patch_size, model_name=m.model_name,
                                    crop_size=cfg.data.crop_size, pred_depth=m.pred_depth,
                                    pred_emb_dim=m.pred_emb_dim, use_cls_token=m.use_cls_token)
    runs = {'ours': build_step(cfg, device, encoder, predictor)}
    if args.ijepa_ref:
        ref = load_ijepa_vit(args.ijepa_ref)
        ref_encoder = ref.__dict__[m.model_name](img_size=[cfg.data.crop_size], patch_size=cfg.mask.patch_size)
        ref_predictor = ref.vit_predictor(num_patches=ref_encoder.patch_embed.num_patches,
                                          embed_dim=ref_encoder.embed_dim, predictor_embed_dim=m.pred_emb_dim,
                                          depth=m.pred_depth, num_heads=ref_encoder.num_heads)
        ref_encoder.load_state_dict(encoder.state_dict())       # same weights, same work
        ref_predictor.load_state_dict(predictor.state_dict())
        runs['ijepa'] = build_step(cfg, device, ref_encoder.to(device), ref_predictor.to(device))

    run_batches = {name: batches for name in runs}
    if args.vs:
        cfg_vs = load_config(args.vs)
        cfg_vs.dseq.lambda_start = cfg_vs.dseq.lambda_end = args.dseq_lambda
        cfg_vs.data.batch_size = cfg.data.batch_size
        torch.manual_seed(cfg_vs.meta.seed)
        mv = cfg_vs.meta
        enc_vs, pred_vs = init_model(device, patch_size=cfg_vs.mask.patch_size, model_name=mv.model_name,
                                     crop_size=cfg_vs.data.crop_size, pred_depth=mv.pred_depth,
                                     pred_emb_dim=mv.pred_emb_dim, use_cls_token=mv.use_cls_token)
        runs['vs'] = build_step(cfg_vs, device, enc_vs, pred_vs)
        run_batches['vs'] = make_batches(cfg_vs, len(batches), args.real_data)
    times = {name: [] for name in runs}
    order = list(runs.items())
    for i in range(len(batches)):
        # interleaved, so that noise hits every implementation alike; the order alternates, so that neither always
        # runs right after the other
        for name, step_fn in (order if i % 2 == 0 else order[::-1]):
            ms = timed(step_fn, run_batches[name][i], i, device)
            if i >= args.warmup:
                times[name].append(ms)

    B = cfg.data.batch_size
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f'config {args.fname}: {m.method} {m.model_name}/{cfg.mask.patch_size} at {cfg.data.crop_size}px, '
          f'batch {B}, {device}, {torch.get_num_threads()} threads, '
          f'{"bf16" if runs["ours"].use_bf16 else "fp32"}, {args.steps} timed steps after {args.warmup} warm-up'
          + f', DSeq lambda {args.dseq_lambda}')
    print(f'{"impl":<8}{"median ms":>12}{"min ms":>10}{"images/s":>12}{"vs ours":>10}')
    if args.vs:
        print(f'vs = {args.vs} ({cfg_vs.meta.method}); ours / vs = {median["ours"] / median["vs"]:.2f}')
    for name, t in times.items():
        print(f'{name:<8}{median[name]:>12.1f}{min(t):>10.1f}{B * 1000. / median[name]:>12.1f}'
              f'{median[name] / median["ours"]:>10.2f}')
    if args.flops:   # masks differ between batches: count each timed batch, compare totals
        rate = matmul_gflops(device)
        # each run against its own work: --vs runs another method on its own batches; ijepa's modules do ours
        counted = {name: [step_flops(copy.deepcopy(runs[name]), b) for b in run_batches[name][args.warmup:]]
                   for name in runs if name != 'ijepa'}
        if 'ijepa' in runs:
            counted['ijepa'] = counted['ours']
        for name, flops in counted.items():
            floor_ms = sum(flops) / rate / 1e6
            print(f'{name}: step FLOPs {sum(flops) / len(flops) / 1e9:.1f} G (mean); matmul rate {rate:.1f} GFLOP/s; '
                  f'time at that rate {floor_ms / len(flops):.1f} ms/step; it reaches '
                  f'{100 * floor_ms / sum(times[name]):.0f}% of it')
    print(f'step_ms={median["ours"]:.1f} images_per_s={B * 1000. / median["ours"]:.1f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
