"""Shared helpers for the tests: a tiny config that trains in seconds on a CPU."""
import copy

import torch
import yaml

TINY = {
    'meta': {'model_name': 'vit_pico', 'pred_depth': 2, 'pred_emb_dim': 16, 'use_bfloat16': False, 'seed': 0},
    'data': {'dataset': 'synthetic', 'limit_images': 64, 'batch_size': 8, 'crop_size': 32, 'crop_scale': [0.3, 1.0],
             'num_workers': 0, 'pin_mem': False},
    'mask': {'patch_size': 8, 'num_enc_masks': 1, 'num_pred_masks': 2, 'enc_mask_scale': [0.85, 1.0],
             'pred_mask_scale': [0.15, 0.25], 'aspect_ratio': [0.75, 1.5], 'min_keep': 0},
    'optimization': {'epochs': 2, 'warmup': 0.5, 'start_lr': 1.0e-4, 'lr': 1.0e-3, 'final_lr': 1.0e-6,
                     'weight_decay': 0.04, 'final_weight_decay': 0.4, 'ema': [0.996, 1.0], 'ipe_scale': 1.0},
    'logging': {'folder': None, 'write_tag': 'jepa', 'log_freq': 2},
}


def tiny_params(folder, **overrides):
    """TINY with `folder` and dotted overrides, e.g. tiny_params(p, **{'optimization.max_steps': 3})."""
    params = copy.deepcopy(TINY)
    params['logging']['folder'] = str(folder)
    for dotted, value in overrides.items():
        section, key = dotted.split('.')
        params.setdefault(section, {})[key] = value
    return params


def write_config(path, params):
    with open(path, 'w') as f:
        yaml.safe_dump(params, f)
    return str(path)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def read_csv(path):
    """(header, rows as dicts) of a training CSV log."""
    with open(path) as f:
        header = f.readline().strip().split(',')
        rows = [dict(zip(header, line.strip().split(','))) for line in f if line.strip()]
    return header, rows


def assert_same_weights(a, b):
    """Two checkpoints hold exactly the same encoder, predictor and target encoder."""
    for key in ('encoder', 'predictor', 'target_encoder'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'


def train_straight_and_resumed(train, params, folder, steps, split_at):
    """Train `steps` steps straight, and `split_at` steps + resume to `steps` in another folder; check that the
    resumed run started at `split_at` and that both end with the same weights and optimizer state.
    `params(folder, max_steps)` gives the config. Returns the two CSV row lists (straight, resumed)."""
    straight, split = folder / 'straight', folder / 'split'
    train(params(straight, steps))
    train(params(split, split_at))
    assert load(split / 'jepa-latest.pth.tar')['step'] == split_at
    assert train(params(split, steps))['start_step'] == split_at
    a, b = load(straight / 'jepa-latest.pth.tar'), load(split / 'jepa-latest.pth.tar')
    assert a['step'] == b['step'] == steps
    assert_same_weights(a, b)
    for sa, sb in zip(a['opt']['state'].values(), b['opt']['state'].values()):   # the optimizer continues too
        assert torch.equal(sa['exp_avg'], sb['exp_avg'])
    return read_csv(straight / 'jepa_r0.csv')[1], read_csv(split / 'jepa_r0.csv')[1]
