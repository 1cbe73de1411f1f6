# Model, optimiser and checkpoint helpers with ijepa's public signatures (extended only by keyword arguments).

import logging
import os
import pickle

import torch

import src.models.vision_transformer as vit
from src.utils.schedulers import CosineWDSchedule, WarmupCosineSchedule

logger = logging.getLogger()


def strip_module_prefix(state_dict):
    """ijepa saved its models through DDP, so their keys start with 'module.'; accept both forms."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def unwrap(model):
    """The bare module inside DDP / torch.compile wrappers."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def torch_load(path, map_location='cpu', mmap=False):
    """torch.load with weights_only=True, falling back (with a warning) for files holding other Python objects.
    mmap: map the tensors instead of reading them (to look at a checkpoint's small entries), where the file's
    format allows it (not torch's legacy one)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        logger.warning(f'{path} is not loadable with weights_only=True ({str(e).splitlines()[0]}); '
                       'loading it with weights_only=False: only do this for files you trust')
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        return torch_load(path, map_location)           # a legacy-format file: read it whole


def load_checkpoint(
    device,
    r_path,
    encoder,
    predictor,
    target_encoder,
    opt,
    scaler,
    extras=None,
):
    """Load a training checkpoint (ours or ijepa's) into the given modules; returns ijepa's tuple.

    Unlike ijepa this does not swallow errors: a missing or mismatched checkpoint raises, naming the file.
    If `extras` is a dict, it receives the checkpoint's other entries (step, itr, rng state, config, ...).
    """
    checkpoint = torch_load(r_path)
    epoch = checkpoint['epoch']
    try:
        for name, module in (('encoder', encoder), ('predictor', predictor), ('target_encoder', target_encoder)):
            if module is None:
                continue
            msg = unwrap(module).load_state_dict(strip_module_prefix(checkpoint[name]))
            logger.info(f'loaded {name} from epoch {epoch} with msg: {msg}')
        if opt is not None:
            opt.load_state_dict(checkpoint['opt'])
        if scaler is not None and checkpoint.get('scaler'):     # a disabled scaler saves {}: nothing to load
            scaler.load_state_dict(checkpoint['scaler'])
    except (KeyError, RuntimeError, ValueError) as e:
        raise RuntimeError(f'cannot resume from {r_path}: {e}') from e
    logger.info(f'loaded checkpoint from epoch {epoch}: {r_path}')
    if extras is not None:
        extras.update({k: v for k, v in checkpoint.items()
                       if k not in ('encoder', 'predictor', 'target_encoder', 'opt', 'scaler')})
    return encoder, predictor, target_encoder, opt, scaler, epoch


def latest_checkpoint(folder, tag='jepa'):
    """The checkpoint a run refreshes as it trains, and resumes from: {folder}/{tag}-latest.pth.tar."""
    return os.path.join(folder, f'{tag}-latest.pth.tar')


def save_checkpoint(path, state):
    """Write `state` atomically: a temporary file in the same folder, then a rename over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def init_model(
    device,
    patch_size=16,
    model_name='vit_base',
    crop_size=224,
    pred_depth=6,
    pred_emb_dim=384,
    use_cls_token=False,
    init_rescale=False,
    in_chans=3,
):
    """Build (encoder, predictor) on `device`. Weights are initialised once, in the constructors
    (see `src.models.vision_transformer.init_weights`)."""
    if model_name not in vit.VIT_SIZES:
        raise ValueError(f'unknown model_name {model_name!r}; choose one of {list(vit.VIT_SIZES)}')
    encoder = vit.__dict__[model_name](img_size=[crop_size], patch_size=patch_size, in_chans=in_chans,
                                       use_cls_token=use_cls_token, init_rescale=init_rescale)
    predictor = vit.__dict__['vit_predictor'](
        num_patches=encoder.patch_embed.num_patches,
        grid_size=encoder.patch_embed.grid_size,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=pred_emb_dim,
        depth=pred_depth,
        num_heads=encoder.num_heads,
        init_rescale=init_rescale)
    encoder.to(device)
    predictor.to(device)
    n_enc = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    n_pred = sum(p.numel() for p in predictor.parameters() if p.requires_grad)
    logger.info(f'{model_name}/{patch_size} encoder: {n_enc / 1e6:.2f}M parameters; '
                f'predictor depth {pred_depth} width {pred_emb_dim}: {n_pred / 1e6:.2f}M parameters')
    return encoder, predictor


def param_groups(encoder, predictor):
    """ijepa's four AdamW groups: weight matrices of each model, then biases and 1-D parameters (no decay)."""
    # frozen parameters (pos_embed) stay in the groups, as in ijepa, so ijepa's optimizer states load
    def split(model, decay):
        return [p for n, p in model.named_parameters() if (('bias' not in n) and p.ndim != 1) == decay]
    return [
        {'params': split(encoder, True)},
        {'params': split(predictor, True)},
        {'params': split(encoder, False), 'WD_exclude': True, 'weight_decay': 0},
        {'params': split(predictor, False), 'WD_exclude': True, 'weight_decay': 0},
    ]


def init_opt(
    encoder,
    predictor,
    iterations_per_epoch,
    start_lr,
    ref_lr,
    warmup,
    num_epochs,
    wd=1e-6,
    final_wd=1e-6,
    final_lr=0.0,
    use_bfloat16=False,
    ipe_scale=1.25,
):
    """AdamW over ijepa's parameter groups with ijepa's LR and weight-decay schedules.

    Returns (optimizer, scaler, scheduler, wd_scheduler); `scaler` is a GradScaler when use_bfloat16 (as in
    ijepa; disabled without CUDA, where it passes the loss and the step through), else None.
    """
    optimizer = torch.optim.AdamW(param_groups(encoder, predictor))
    total = int(ipe_scale * num_epochs * iterations_per_epoch)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=int(warmup * iterations_per_epoch),
                                     start_lr=start_lr, ref_lr=ref_lr, final_lr=final_lr, T_max=total)
    wd_scheduler = CosineWDSchedule(optimizer, ref_wd=wd, final_wd=final_wd, T_max=total)
    scaler = torch.amp.GradScaler('cuda', enabled=torch.cuda.is_available()) if use_bfloat16 else None
    return optimizer, scaler, scheduler, wd_scheduler


def load_encoder(path=None, which='target_encoder', device='cpu', model_name=None, patch_size=None, crop_size=None,
                 use_cls_token=False):
    """A frozen encoder for evaluation, and a dict describing it.

    From any checkpoint this project writes (I-JEPA or DSeq-JEPA, with or without [CLS], with or without
    'module.') the architecture comes from the checkpoint's own config; ijepa's released checkpoints carry no config,
    so `model_name` and `patch_size` must be given. The crop size follows from the position embedding and the
    [CLS] token from the weights. `which`: 'target_encoder' (default, the EMA encoder) or 'encoder'.
    With path None: a randomly initialised encoder of the given architecture (the baseline of a probe; seed 0, so
    the same weights every time).
    """
    state, cfg, extras = None, {}, {}
    if path is not None:
        checkpoint = torch_load(path)
        if which not in checkpoint:
            raise KeyError(f'{path} has no {which!r}; it holds {sorted(checkpoint)}')
        state = strip_module_prefix(checkpoint[which])
        cfg = checkpoint.get('config') or {}
        extras = {k: checkpoint[k] for k in ('epoch', 'step', 'method') if k in checkpoint}
    model_name = model_name or cfg.get('meta', {}).get('model_name')
    patch_size = patch_size or cfg.get('mask', {}).get('patch_size')
    if model_name is None or patch_size is None:
        raise ValueError(f'{path}: the checkpoint has no config; give model_name and patch_size '
                         '(e.g. vit_huge and 14 for ijepa\'s released IN-1K ViT-H/14)')
    if model_name not in vit.VIT_SIZES:
        raise ValueError(f'unknown model_name {model_name!r}; choose one of {list(vit.VIT_SIZES)}')
    if state is not None:
        use_cls_token = 'cls_token' in state
        num_patches = state['pos_embed'].shape[1]
        side = int(round(num_patches ** 0.5))
        stored = cfg.get('data', {}).get('crop_size')
        # build at the size the weights were trained for; a requested crop_size only sets the default evaluation
        # resolution (the position embedding is interpolated for other sizes)
        built = stored if stored and (stored // patch_size) ** 2 == num_patches else side * patch_size
        crop_size = crop_size or built
    else:
        built = crop_size = crop_size or 224
    with torch.random.fork_rng(devices=[]):        # a random-init baseline is the same encoder every time
        torch.manual_seed(0)
        encoder = vit.__dict__[model_name](img_size=[built], patch_size=patch_size, use_cls_token=use_cls_token)
    if state is not None:
        try:
            encoder.load_state_dict(state)
        except RuntimeError as e:
            raise RuntimeError(f'{path}: {which} does not fit {model_name}/{patch_size}: {e}') from e
    encoder.to(device).eval().requires_grad_(False)
    info = {'checkpoint': path, 'which': which if path else 'random_init', 'model_name': model_name,
            'patch_size': patch_size, 'crop_size': crop_size, 'use_cls_token': use_cls_token,
            'normalization': cfg.get('data', {}).get('normalization', ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
            **extras}
    return encoder, info
