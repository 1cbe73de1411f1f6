# The evaluations behind a small registry: name -> (function, features it needs). `run` loads the encoder once,
# computes (or reads from the cache) the features the requested evaluations need, runs them and records the
# results in {logging.folder}/{write_tag}.csv (one row per evaluation) and {write_tag}.json (with the curves).

import csv
import dataclasses
import json
import logging
import os
from importlib import import_module

import torch
from torch.utils.data import DataLoader

from evals import knn, linear_probe
from evals.data import make_eval_datasets
from evals.features import cached_features, digest, file_identity
from src.helper import load_encoder

logger = logging.getLogger()

REGISTRY = {
    'knn': (knn.evaluate, lambda cfg: cfg.knn.pooling),
    'linear': (linear_probe.make_evaluate('last4'), lambda cfg: 'last4'),
    'linear_last': (linear_probe.make_evaluate('last'), lambda cfg: 'last'),
}


def register(name, evaluate, pooling):
    REGISTRY[name] = (evaluate, pooling)


CSV_COLUMNS = ('eval', 'top1', 'dataset', 'subset', 'resolution', 'checkpoint', 'which', 'method', 'step')


def signature(cfg):
    """What an evaluation's results depend on: the eval config (without its output folder) and the checkpoint file
    (path, size, modification time). evals.ab reuses stored results only when this matches."""
    desc = cfg.to_dict()
    desc.pop('logging', None)
    desc['pretrain']['checkpoint'] = file_identity(cfg.pretrain.checkpoint)
    return digest(desc)


def random_init_config(cfg, subfolder=True):
    """The same evaluation on a randomly initialised encoder of the checkpoint's architecture; with `subfolder`,
    written to {logging.folder}/random_init, beside (not over) the checkpoint's results."""
    _, info = load_encoder(cfg.pretrain.checkpoint, which=cfg.pretrain.which, model_name=cfg.pretrain.model_name,
                           patch_size=cfg.pretrain.patch_size, crop_size=cfg.pretrain.crop_size,
                           use_cls_token=cfg.pretrain.use_cls_token)
    pretrain = dataclasses.replace(cfg.pretrain, checkpoint=None, model_name=info['model_name'],
                                   patch_size=info['patch_size'], crop_size=info['crop_size'],
                                   use_cls_token=info['use_cls_token'])
    data = dataclasses.replace(cfg.data, normalization=cfg.data.normalization or info['normalization'])
    folder = os.path.join(cfg.logging.folder, 'random_init') if subfolder else cfg.logging.folder
    return dataclasses.replace(cfg, pretrain=pretrain, data=data,
                               logging=dataclasses.replace(cfg.logging, folder=folder))


def run(cfg, device='cpu'):
    """Run the evaluations of `cfg` (an EvalConfig); returns a list of result dicts."""
    if 'attentive' in cfg.evals and 'attentive' not in REGISTRY:
        import_module('evals.attentive_probe')          # registers itself
    device = torch.device(device)
    p = cfg.pretrain
    encoder, info = load_encoder(p.checkpoint, which=p.which, device=device, model_name=p.model_name,
                                 patch_size=p.patch_size, crop_size=p.crop_size, use_cls_token=p.use_cls_token)
    resolution = cfg.data.resolution or info['crop_size']
    normalization = cfg.data.normalization or info['normalization']
    logger.info(f'evaluating {info["which"]} of {p.checkpoint or info["model_name"]} ({info["model_name"]}/'
                f'{info["patch_size"]}) on {cfg.data.dataset}{"/" + cfg.data.subset if cfg.data.subset else ""} '
                f'at {resolution} px: {", ".join(cfg.evals)}')
    train_set, test_set = make_eval_datasets(cfg.data, resolution, normalization)
    poolings = sorted({REGISTRY[name][1](cfg) for name in cfg.evals})
    cache_dir = (cfg.features.cache_dir or os.path.join(cfg.logging.folder, 'features')) if cfg.features.cache else None
    features = {}
    for split, dataset in (('train', train_set), ('test', test_set)):
        loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                            pin_memory=device.type == 'cuda')
        features[split] = cached_features(encoder, info, loader, cfg.data, resolution, normalization, split, poolings,
                                          device, cache_dir)
    results, sig = [], signature(cfg)
    for name in cfg.evals:
        evaluate, _ = REGISTRY[name]
        out = evaluate(cfg, features['train'], features['test'], device)
        row = {'eval': name, 'top1': round(out['top1'], 3), 'dataset': cfg.data.dataset, 'subset': cfg.data.subset,
               'resolution': resolution, 'checkpoint': p.checkpoint, 'which': info['which'],
               'method': info.get('method'), 'step': info.get('step')}
        logger.info(f'{name}: top-1 {out["top1"]:.2f}% ({len(features["test"][1])} test images)')
        results.append({**row, 'curve': out.get('curve'), 'signature': sig})
    record(cfg.logging.folder, cfg.logging.write_tag, results)
    return results


def record(folder, tag, results):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{tag}.csv')
    new = not os.path.isfile(path)
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction='ignore')
        if new:
            writer.writeheader()
        writer.writerows(results)
    with open(os.path.join(folder, f'{tag}.json'), 'w') as f:
        json.dump(results, f, indent=1)


def evaluate_checkpoint(fname, checkpoint, folder, random_init=False, device='cpu'):
    """Run the eval config `fname` on `checkpoint`, writing to `folder` (and, with `random_init`, the same
    evaluations of a randomly initialised encoder of its architecture to folder/random_init). Prints one line per
    evaluation and returns {'pretrained': results, 'random_init': results or None}."""
    from evals.config import load_eval_config
    cfg = load_eval_config(fname, {'pretrain.checkpoint': checkpoint, 'logging.folder': folder})
    out = {'pretrained': run(cfg, device), 'random_init': None}
    if random_init:
        out['random_init'] = run(random_init_config(cfg), device)
    for r in out['pretrained']:
        base = next((b for b in out['random_init'] or [] if b['eval'] == r['eval']), None)
        print(f'{r["eval"]}: top-1 {r["top1"]:.2f}%' + (f' (random init: {base["top1"]:.2f}%)' if base else ''),
              flush=True)
    return out
