# Evaluation configs: typed sections like the pretraining config (src/config.py), so a misspelled key or a wrong
# type stops start-up naming the key.

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


from src.config import ConfigError, build_section, read_config_file, require, set_keys

EVALS = ('knn', 'linear', 'linear_last', 'attentive')
POOLINGS = ('last', 'last4')


@dataclass
class PretrainConfig:
    checkpoint: Optional[str] = None     # a checkpoint of this project or ijepa's; null: random init (baseline)
    which: str = 'target_encoder'        # target_encoder (EMA, default) | encoder
    model_name: Optional[str] = None     # needed only for checkpoints without a config (ijepa's) or random init
    patch_size: Optional[int] = None
    crop_size: Optional[int] = None      # default: from the checkpoint (random init: 224)
    use_cls_token: bool = False          # random init only (a checkpoint says it itself)


@dataclass
class EvalDataConfig:
    dataset: str = 'fashion_mnist'       # a key of evals.data.DATASETS
    root_path: Optional[str] = 'data'
    subset: Optional[str] = None         # fashion_mnist: 'tops' (T-shirt, Pullover, Coat, Shirt)
    resolution: Optional[int] = None     # images are resized and centre-cropped to this; default: the crop size
    normalization: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None  # default: the
                                         # checkpoint's pretraining normalisation
    batch_size: int = 256                # feature extraction
    num_workers: int = 0
    limit_train: Optional[int] = None    # N evenly spaced images of each split (smoke tests)
    limit_test: Optional[int] = None


@dataclass
class FeaturesConfig:
    cache: bool = True                   # features are computed once per checkpoint, data and resolution
    cache_dir: Optional[str] = None      # default: {logging.folder}/features


@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024               # test images compared with the whole train set at once
    pooling: str = 'last'                # average-pooled final features


@dataclass
class LinearConfig:
    # the paper's protocol (SPEC section 4): BatchNorm + linear on the average-pooled outputs of the last 4 blocks,
    # SGD momentum 0.9, 28 epochs, LR 0.01 x batch / 256, x0.1 at epochs 8, 16, 24, weight decay 5e-4
    epochs: int = 28
    batch_size: int = 256
    lr: float = 0.01                     # at batch 256; scaled linearly with batch_size
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    milestones: Tuple[int, ...] = (8, 16, 24)
    gamma: float = 0.1
    seed: int = 0


@dataclass
class AttentiveConfig:
    # V-JEPA's attentive probe: one cross-attention block with a learnable query over the patch tokens, then linear
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    num_heads: int = 4
    seed: int = 0


@dataclass
class EvalLoggingConfig:
    folder: str = 'logs/evals'
    write_tag: str = 'evals'


@dataclass
class EvalConfig:
    evals: List[str] = field(default_factory=lambda: ['knn', 'linear'])
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)
    logging: EvalLoggingConfig = field(default_factory=EvalLoggingConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


def parse_eval_config(params):
    cfg = build_section(EvalConfig, params, '')
    from evals.data import DATASETS
    checks = [
        (len(cfg.evals) > 0 and all(e in EVALS for e in cfg.evals), 'evals', f'a list of {EVALS}'),
        (cfg.pretrain.which in ('target_encoder', 'encoder'), 'pretrain.which', "'target_encoder' or 'encoder'"),
        (cfg.data.dataset in DATASETS, 'data.dataset', f'one of {tuple(DATASETS)}'),
        (cfg.data.batch_size >= 1, 'data.batch_size', 'at least 1'),
        (cfg.data.resolution is None or cfg.data.resolution >= 1, 'data.resolution', 'null or at least 1'),
        (all(n is None or n >= 1 for n in (cfg.data.limit_train, cfg.data.limit_test)),
         'data.limit_train/limit_test', 'null or at least 1'),
        (cfg.knn.k >= 1, 'knn.k', 'at least 1'),
        (cfg.knn.temperature > 0, 'knn.temperature', '> 0'),
        (cfg.knn.chunk_size >= 1, 'knn.chunk_size', 'at least 1'),
        (cfg.knn.pooling in POOLINGS, 'knn.pooling', f'one of {POOLINGS}'),
        (cfg.linear.epochs >= 1, 'linear.epochs', 'at least 1'),
        (cfg.linear.batch_size >= 2, 'linear.batch_size', 'at least 2 (BatchNorm needs two rows)'),
        (cfg.linear.lr > 0 and cfg.linear.weight_decay >= 0, 'linear.lr/weight_decay', '> 0 and >= 0'),
        (cfg.attentive.epochs >= 1, 'attentive.epochs', 'at least 1'),
        (cfg.attentive.batch_size >= 1 and cfg.attentive.lr > 0, 'attentive.batch_size/lr', '>= 1 and > 0'),
    ]
    require(checks)
    if cfg.pretrain.checkpoint is None and (cfg.pretrain.model_name is None or cfg.pretrain.patch_size is None):
        raise ConfigError('pretrain.checkpoint is null (random init): set pretrain.model_name and '
                          'pretrain.patch_size')
    return cfg


def load_eval_config(fname, overrides=None):
    """Read a yaml eval config; `overrides` maps dotted keys to values (e.g. {'pretrain.checkpoint': path})."""
    params = set_keys(read_config_file(fname), overrides or {})
    try:
        return parse_eval_config(params)
    except ConfigError as e:
        raise ConfigError(f'{fname}: {e}') from None
