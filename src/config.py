# Typed configuration: one dataclass per yaml section, defaults declared once, here.
#
# ijepa's configs (sections meta, data, mask, optimization, logging) load unchanged and keep their meaning; every
# key we add has a default under which an old config means I-JEPA exactly as before. Unknown keys and values of
# the wrong type stop at start-up with the key's dotted name.

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class MetaConfig:
    use_bfloat16: bool = False          # bf16 autocast on CUDA (ijepa's key)
    model_name: str = 'vit_base'        # a key of src.models.vision_transformer.VIT_SIZES
    load_checkpoint: bool = False       # resume from logging.folder/read_checkpoint (or the latest checkpoint)
    read_checkpoint: Optional[str] = None
    copy_data: bool = False             # ijepa's SLURM-specific local copy; not supported (start-up error if true)
    pred_depth: int = 6
    pred_emb_dim: int = 384
    # -- added by this project
    method: str = 'ijepa'               # training objective: 'ijepa' (absent = ijepa)
    use_cls_token: bool = False         # learnable [CLS] token on the encoders (paper Table 6 "I-JEPA + [CLS]")
    init_rescale: bool = False          # depth-scaled init of attn.proj / mlp.fc2 (ijepa effectively: off)
    seed: int = 0                       # global seed; data order, crops and masks derive from (seed, step, rank)
    bfloat16_on_cpu: bool = False       # also autocast to bf16 on CPU (needs a CPU with fast bf16)
    auto_resume: bool = True            # resume from logging.folder/{write_tag}-latest.pth.tar when it exists


@dataclass
class DataConfig:
    batch_size: int = 128               # per process
    color_jitter_strength: float = 0.0
    crop_scale: Tuple[float, float] = (0.3, 1.0)
    crop_size: int = 224
    image_folder: str = 'imagenet_full_size/061417/'
    num_workers: int = 10
    pin_mem: bool = True
    root_path: Optional[str] = None
    use_color_distortion: bool = False
    use_gaussian_blur: bool = False
    use_horizontal_flip: bool = False
    # -- added by this project
    dataset: str = 'imagenet'           # imagenet | imagefolder | fashion_mnist | synthetic
    subset_file: Optional[str] = None   # ijepa's ImageNet subset list (one file name per line)
    limit_images: Optional[int] = None  # use only the first N images (demos, smoke tests; size of 'synthetic')
    normalization: Tuple[Tuple[float, float, float], Tuple[float, float, float]] = (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class MaskConfig:
    allow_overlap: bool = False
    aspect_ratio: Tuple[float, float] = (0.75, 1.5)
    enc_mask_scale: Tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    patch_size: int = 16
    pred_mask_scale: Tuple[float, float] = (0.15, 0.2)
    # -- added by this project
    blocks_reach_edge: bool = False     # fix ijepa's blocks never touching the last row/column


@dataclass
class OptimizationConfig:
    ema: Tuple[float, float] = (0.996, 1.0)
    epochs: int = 300
    final_lr: float = 1.0e-6
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    lr: float = 1.0e-3
    start_lr: float = 2.0e-4
    warmup: float = 40
    weight_decay: float = 0.04
    # -- added by this project
    max_steps: Optional[int] = None     # stop (with a checkpoint) after this many global steps; schedules still
                                        # span `epochs`


@dataclass
class LoggingConfig:
    folder: str = 'logs/'
    write_tag: str = 'jepa'
    # -- added by this project
    log_freq: int = 10                  # stdout line and CSV flush every this many steps
    checkpoint_freq: int = 50           # also keep {write_tag}-ep{N}.pth.tar every this many epochs
    checkpoint_steps: Optional[int] = None   # refresh the latest checkpoint every this many steps (mid-epoch)
    save_all_ranks: bool = False        # ranks > 0 also write {write_tag}-latest_r{rank}.pth.tar (for checks)


@dataclass
class DSeqConfig:
    """DSeq-JEPA (meta.method: dseq); see docs/dseq.md for each key's equation or table in the paper."""
    num_regions: int = 5                 # N: the N - 1 most salient regions, then the background
    min_region_area: float = 0.15        # alpha: drop components smaller than alpha * patches
    saliency: str = 'cls_similarity'     # cls_similarity (paper Eq. 1) | cls_attention | column_mean | gradcam
    saliency_encoder: str = 'target'     # target (its own pass, free) | context (an extra no-grad pass)
    saliency_block: Optional[int] = None  # block l whose output scores the patches (1-based); None: 10/12 of depth
    saliency_layers: str = 'last'        # cls_attention, column_mean: attention of the 'last' block or of 'all'
    regions: str = 'components'          # components (paper) | blocks (NMS over scored boxes) | random_blocks
    num_candidates: int = 32             # blocks: candidate boxes per image
    nms_iou: float = 0.5                 # blocks: greedy non-maximum suppression threshold
    prediction: str = 'sequential'       # sequential (paper Eq. 5) | chained | flat
    order: str = 'descending'            # descending (paper) | ascending | random | spatial
    truncate_regions: Optional[int] = None   # keep only each image's first k non-empty regions (top-k)
    lambda_start: float = 0.0            # curriculum: probability of keeping a salient region, rising linearly
    lambda_end: float = 1.0
    curriculum: str = 'per_region'       # per_region (paper Alg. 1) | per_iteration (official code)
    fill_first_region: bool = True       # an image with no salient region takes a random box as R_1
    loss_reduction: str = 'per_region'   # per_region: per-step mean, summed over steps | pooled: mean of tokens
    loss_beta: float = 1.0               # smooth-L1 beta
    static_shapes: bool = False          # true: no host synchronisation in the step; every step is padded to the
                                         # full grid (more encoder work: S * N tokens per image instead of the
                                         # contexts' sizes). false: one read of the sizes per step, no padding waste


@dataclass
class EvaluationConfig:
    fname: Optional[str] = None          # an evaluation config (configs/evals/*.yaml): when training ends, rank 0
                                         # evaluates the final checkpoint with it and prints the accuracies
    random_init_baseline: bool = False   # also evaluate a randomly initialised encoder of the same architecture


@dataclass
class Config:
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dseq: DSeqConfig = field(default_factory=DSeqConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self):
        return _to_plain(dataclasses.asdict(self))


METHODS = ('ijepa', 'dseq')
SALIENCY = ('cls_similarity', 'cls_attention', 'column_mean', 'gradcam')
DATASETS = ('imagenet', 'imagefolder', 'fashion_mnist', 'synthetic')


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value, hint, key):
    """Check `value` against the type hint `hint`; returns the value converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key}: expected a list, got {value!r}')
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f'{key}: expected {len(args)} values, got {list(value)!r}')
            return tuple(_coerce(v, a, f'{key}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        out = [_coerce(v, item, f'{key}[{i}]') for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if hint is typing.Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{key}: expected true or false, got {value!r}')
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{key}: expected an integer, got {value!r}')
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string; ijepa casts with float()
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{key}: expected a number, got {value!r}')
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f'{key}: expected a string, got {value!r}')
        return value
    raise TypeError(f'unsupported config type {hint} for {key}')


def build_section(cls, values, prefix):
    """A dataclass `cls` from a yaml mapping, checking every key and type (`prefix` names the section in errors)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f'{prefix or "config"}: expected a mapping, got {values!r}')
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        keys = ', '.join(f'{prefix}{k}' for k in unknown)
        raise ConfigError(f'unknown config key(s): {keys} (known keys of {prefix.rstrip(".") or "the config"}: '
                          f'{", ".join(sorted(names))})')
    kwargs = {}
    for name in names & set(values):
        key = f'{prefix}{name}'
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_section(hints[name], values[name], key + '.')
        else:
            kwargs[name] = _coerce(values[name], hints[name], key)
    return cls(**kwargs)


def _validate(cfg):
    from src.models.vision_transformer import VIT_SIZES
    checks = [
        (cfg.meta.method in METHODS, 'meta.method', f'one of {METHODS}'),
        (cfg.meta.model_name in VIT_SIZES, 'meta.model_name', f'one of {tuple(VIT_SIZES)}'),
        (cfg.data.dataset in DATASETS, 'data.dataset', f'one of {DATASETS}'),
        (cfg.data.batch_size >= 1, 'data.batch_size', 'at least 1'),
        (cfg.data.num_workers >= 0, 'data.num_workers', '>= 0'),
        (cfg.data.crop_size >= cfg.mask.patch_size >= 1, 'data.crop_size',
         f'at least mask.patch_size={cfg.mask.patch_size}'),
        (0. < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1., 'data.crop_scale', '[min, max] in (0, 1]'),
        (cfg.data.limit_images is None or cfg.data.limit_images >= 1, 'data.limit_images', 'null or >= 1'),
        (not cfg.meta.copy_data, 'meta.copy_data',
         'false (copying ImageNet to local scratch is not supported: extract it locally and point '
         'data.root_path at it)'),
        (cfg.meta.pred_depth >= 1, 'meta.pred_depth', 'at least 1'),
        (cfg.optimization.epochs >= 1, 'optimization.epochs', 'at least 1'),
        (cfg.optimization.ipe_scale > 0, 'optimization.ipe_scale', '> 0'),
        (cfg.optimization.warmup >= 0, 'optimization.warmup', '>= 0'),
        (cfg.optimization.max_steps is None or cfg.optimization.max_steps >= 1, 'optimization.max_steps',
         'null or >= 1'),
        (0. <= cfg.optimization.ema[0] <= cfg.optimization.ema[1] <= 1., 'optimization.ema', '[start, end] in [0, 1]'),
        (cfg.logging.log_freq >= 1, 'logging.log_freq', 'at least 1'),
        (cfg.logging.checkpoint_freq >= 1, 'logging.checkpoint_freq', 'at least 1'),
        (cfg.logging.checkpoint_steps is None or cfg.logging.checkpoint_steps >= 1, 'logging.checkpoint_steps',
         'null or >= 1'),
    ]
    d = cfg.dseq
    checks += [
        (d.num_regions >= 2, 'dseq.num_regions', 'at least 2'),
        (0. <= d.min_region_area < 1., 'dseq.min_region_area', 'in [0, 1)'),
        (d.saliency in SALIENCY, 'dseq.saliency', f'one of {SALIENCY}'),
        (d.saliency_encoder in ('target', 'context'), 'dseq.saliency_encoder', "'target' or 'context'"),
        (d.num_candidates >= 1, 'dseq.num_candidates', 'at least 1'),
        (0. < d.nms_iou <= 1., 'dseq.nms_iou', 'in (0, 1]'),
        (d.saliency_layers in ('last', 'all'), 'dseq.saliency_layers', "'last' or 'all'"),
        (d.regions in ('components', 'blocks', 'random_blocks'), 'dseq.regions',
         "'components', 'blocks' or 'random_blocks'"),
        (d.prediction in ('sequential', 'chained', 'flat'), 'dseq.prediction', "'sequential', 'chained' or 'flat'"),
        (d.order in ('descending', 'ascending', 'random', 'spatial'), 'dseq.order',
         "'descending', 'ascending', 'random' or 'spatial'"),
        (d.truncate_regions is None or 2 <= d.truncate_regions <= d.num_regions, 'dseq.truncate_regions',
         'null or in 2..dseq.num_regions'),
        (0. <= d.lambda_start <= 1. and 0. <= d.lambda_end <= 1., 'dseq.lambda_start/lambda_end', 'in [0, 1]'),
        (d.curriculum in ('per_region', 'per_iteration'), 'dseq.curriculum', "'per_region' or 'per_iteration'"),
        (d.loss_reduction in ('per_region', 'pooled'), 'dseq.loss_reduction', "'per_region' or 'pooled'"),
        (d.loss_beta > 0, 'dseq.loss_beta', '> 0'),
    ]
    require(checks)
    depth = VIT_SIZES[cfg.meta.model_name]['depth']
    if d.saliency_block is not None and not 1 <= d.saliency_block <= depth:
        raise ConfigError(f'dseq.saliency_block must be in 1..{depth} for {cfg.meta.model_name}')
    if (cfg.meta.method == 'dseq' and d.regions != 'random_blocks' and d.saliency != 'column_mean'
            and not cfg.meta.use_cls_token):
        raise ConfigError(f'dseq.saliency={d.saliency} needs the [CLS] token: set meta.use_cls_token: true')
    heads = VIT_SIZES[cfg.meta.model_name]['num_heads']
    if cfg.meta.pred_emb_dim % heads != 0:
        raise ConfigError(f'meta.pred_emb_dim={cfg.meta.pred_emb_dim} must be divisible by the {heads} attention '
                          f'heads of {cfg.meta.model_name} (the predictor uses the encoder\'s head count)')
    if cfg.data.dataset in ('imagenet', 'imagefolder') and not cfg.data.root_path:
        raise ConfigError(f'data.root_path must be set for data.dataset={cfg.data.dataset}')
    if cfg.evaluation.fname is not None:        # fail now, not after training
        from evals.config import load_eval_config
        try:
            load_eval_config(cfg.evaluation.fname, {'pretrain.checkpoint': 'the final checkpoint'})
        except ConfigError as e:
            raise ConfigError(f'evaluation.fname: {e}') from None
    return cfg


def parse_config(params):
    """A dict as read from yaml (ijepa's `args`) -> validated `Config`."""
    return _validate(build_section(Config, params, ''))


def require(checks):
    """Stop at the first (ok, key, expected) whose `ok` is false, naming the key and what it must be."""
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f'{key} must be {expected}')


def read_config_file(fname):
    """The yaml mapping of a config file ({} if it is empty)."""
    try:
        with open(fname, 'r') as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {fname}') from None
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f'{fname}: expected a mapping of config sections (meta:, data:, ...), '
                          f'got a {type(params).__name__}')
    return params or {}


def set_keys(params, overrides):
    """Apply {'section.key' (or a top-level 'key'): value} to a config mapping as read from yaml; a section left
    empty in the yaml (read as None) becomes a mapping."""
    for dotted, value in overrides.items():
        section, key = dotted.split('.') if '.' in dotted else (None, dotted)
        if section and params.get(section) is None:
            params[section] = {}
        (params[section] if section else params)[key] = value
    return params


def load_config(fname):
    params = read_config_file(fname)
    try:
        return parse_config(params)
    except ConfigError as e:
        raise ConfigError(f'{fname}: {e}') from None


def dump_config(cfg, fname):
    with open(fname, 'w') as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

