# Frozen-encoder features, computed once per (checkpoint, data, resolution) and cached on disk, so that several
# probes (k-NN, linear on the last 4 blocks, linear on the last block) reuse one pass over the data.
#
# Poolings (N patch tokens, D width, L blocks):
#   last   mean over patches of the final normalised output                                   [D]
#   last4  the outputs of blocks L-3..L, each through the final LayerNorm and averaged over patches,
#          concatenated (the paper's linear probe; SPEC section 4)                              [4D]
#   tokens the final normalised patch tokens, for the attentive probe (float16 in the cache)    [N, D]

import hashlib
import json
import logging
import os
import time

import torch

from src.helper import save_checkpoint, torch_load

logger = logging.getLogger()


@torch.no_grad()
def extract(encoder, loader, device, poolings=('last', 'last4')):
    """{pooling: features [n, ...]} and labels [n] of every item of `loader`, in order."""
    depth = encoder.depth
    blocks = tuple(range(max(1, depth - 3), depth + 1))
    out = {p: [] for p in poolings}
    labels = []
    done, t0 = 0, time.time()
    for imgs, y in loader:
        imgs = imgs.to(device, non_blocking=True)
        f = encoder.forward_features(imgs, return_blocks=blocks if 'last4' in poolings else ())
        if 'last' in poolings:
            out['last'].append(f['x'].mean(dim=1).float().cpu())
        if 'last4' in poolings:
            out['last4'].append(torch.cat([encoder.norm(f['blocks'][b]).mean(dim=1) for b in blocks], dim=1)
                                .float().cpu())
        if 'tokens' in poolings:
            out['tokens'].append(f['x'].half().cpu())
        labels.append(torch.as_tensor(y))
        done += len(imgs)
        if time.time() - t0 > 30:
            logger.info(f'features: {done} / {len(loader.dataset)} images')
            t0 = time.time()
    return {p: torch.cat(v) for p, v in out.items()}, torch.cat(labels).long()


def file_identity(path):
    """[absolute path, size, modification time] of a file (None for no file): changes when the file is rewritten."""
    if not path:
        return None
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def digest(desc):
    """A stable hash of a JSON-able description."""
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(info, data, resolution, normalization, split, poolings, dataset=None):
    """A name that changes with anything that changes the features: the checkpoint file (path, size, mtime),
    which encoder, the data (settings, number of items, class list) and its preprocessing, and the poolings."""
    desc = {'checkpoint': file_identity(info['checkpoint']), 'which': info['which'], 'model': info['model_name'],
            'dataset': data.dataset, 'root': os.path.abspath(data.root_path or '.'), 'subset': data.subset,
            'limit': data.limit_train if split == 'train' else data.limit_test, 'resolution': resolution,
            'normalization': [list(n) for n in normalization], 'split': split, 'poolings': sorted(poolings),
            'items': len(dataset) if dataset is not None else None,
            'classes': list(getattr(getattr(dataset, 'dataset', dataset), 'classes', None) or [])}
    return f'{data.dataset}{"-" + data.subset if data.subset else ""}_{split}_{digest(desc)[:16]}.pt'


def cached_features(encoder, info, loader, data, resolution, normalization, split, poolings, device, cache_dir):
    """extract(), through a cache file in `cache_dir` (None: no cache). Random-init encoders are not cached."""
    path = None
    if cache_dir and info['checkpoint']:
        path = os.path.join(cache_dir, cache_key(info, data, resolution, normalization, split, poolings,
                                                 loader.dataset))
        if os.path.isfile(path):
            cached = torch_load(path)
            if len(cached['labels']) == len(loader.dataset):
                logger.info(f'features of {split} read from {path}')
                return cached['features'], cached['labels']
    t0 = time.time()
    features, labels = extract(encoder, loader, device, poolings)
    logger.info(f'features of {split}: {len(labels)} images in {time.time() - t0:.1f} s')
    if path:
        save_checkpoint(path, {'features': features, 'labels': labels})
    return features, labels
