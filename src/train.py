# Pretraining loop shared by every method. What differs between methods lives in src/objectives/ (one objective
# per method, chosen by meta.method); this file only runs it: schedules, forward and loss, backward and step,
# EMA, logging, checkpoints.

import copy
import logging
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from src.config import Config, ConfigError, dump_config, parse_config
from src.datasets import make_dataset
from src.datasets.loader import TrainLoader
from src.helper import init_model, init_opt, latest_checkpoint, load_checkpoint, save_checkpoint, torch_load, unwrap
from src.masks.utils import seed_from
from src.objectives import make_objective, objective_class
from src.transforms import make_transforms
from src.utils.distributed import AllReduce, init_distributed
from src.utils.logging import CSVLogger, StepTimer, grad_logger
from src.utils.schedulers import cosine_wd, linear_momentum, warmup_cosine_lr

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
logger = logging.getLogger()

IJEPA_COLUMNS = (('%d', 'epoch'), ('%d', 'itr'), ('%.5f', 'loss'), ('%.5f', 'mask-A'), ('%.5f', 'mask-B'),
                 ('%d', 'time (ms)'))


class NonFiniteLossError(RuntimeError):
    pass


def default_device():
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))
        return torch.device('cuda', local_rank % torch.cuda.device_count())
    return torch.device('cpu')


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


class Schedules:
    """Every schedule as a function of the global step (ijepa's values: LR/WD at step t use t + 1)."""

    def __init__(self, cfg, ipe):
        o = cfg.optimization
        self.o = o
        self.total = int(o.ipe_scale * o.epochs * ipe)
        self.warmup = int(o.warmup * ipe)
        self.ema_total = ipe * o.epochs * o.ipe_scale

    def lr(self, step):
        return warmup_cosine_lr(step + 1, self.warmup, self.o.start_lr, self.o.lr, self.total, self.o.final_lr)

    def wd(self, step):
        return cosine_wd(step + 1, self.o.weight_decay, self.total, self.o.final_weight_decay)

    def momentum(self, step):
        return linear_momentum(step, self.o.ema, self.ema_total)


def ema_update(target_params, online_params, m):
    """target <- m * target + (1 - m) * online, one fused call over all tensors."""
    torch._foreach_mul_(target_params, m)
    torch._foreach_add_(target_params, online_params, alpha=1. - m)


class TrainStep:
    """One optimisation step of any objective: schedules, forward and loss, backward and step, EMA.

    Used by the training loop and by bench/step.py, so the benchmark times exactly what training runs.
    No host synchronisation happens here (the loss is returned as a detached device tensor).
    """

    def __init__(self, objective, optimizer, scaler, schedules, encoder, target_encoder, device, use_bf16,
                 seed=0, rank=0):
        self.objective = objective
        self.optimizer = optimizer
        self.scaler = scaler
        self.schedules = schedules
        self.encoder = encoder
        self.online_params = list(unwrap(encoder).parameters())
        self.target_params = list(target_encoder.parameters())
        self.device = torch.device(device)
        self.use_bf16 = use_bf16
        self.seed, self.rank = seed, rank

    def __call__(self, batch, step, with_grad_stats=False):
        batch = to_device(batch, self.device)
        torch.manual_seed(seed_from(self.seed, self.rank, step))   # model randomness (drop path) is a function of step

        # -- schedules
        lr, wd, m = self.schedules.lr(step), self.schedules.wd(step), self.schedules.momentum(step)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
            if not group.get('WD_exclude', False):
                group['weight_decay'] = wd

        # -- forward and loss
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss, stats = self.objective(batch, step)

        # -- backward and step
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        grad_stats = grad_logger(unwrap(self.encoder).named_parameters()) if with_grad_stats else None
        self.optimizer.zero_grad(set_to_none=True)

        # -- EMA of the target encoder
        with torch.no_grad():
            ema_update(self.target_params, self.online_params, m)
        return loss.detach(), stats, (lr, wd, m), grad_stats


def _trim_csv(path, keep_steps, ipe):
    """Drop rows logged after the checkpoint we resume from, so the CSV has each step once, and a line cut short
    by a kill (no newline, or fields that do not parse; a cut header takes the file with it)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def step(line):
        try:
            epoch, itr = line.split(',')[:2]
            return (int(epoch) - 1) * ipe + int(itr) if line.endswith('\n') else None
        except ValueError:
            return None

    header_ok = bool(lines) and lines[0].endswith('\n')
    kept = lines[:1] + [ln for ln in lines[1:] if (s := step(ln)) is not None and s < keep_steps] if header_ok else []
    if len(kept) != len(lines):
        with open(path, 'w') as f:
            f.writelines(kept)


def resume_path(cfg, resume_preempt=False):
    """The checkpoint a run started with `cfg` continues from, or None; and whether the config asked for it by
    name (meta.load_checkpoint) rather than finding it in its logging.folder."""
    meta, folder = cfg.meta, cfg.logging.folder
    latest_path = latest_checkpoint(folder, cfg.logging.write_tag)
    if resume_preempt and os.path.exists(latest_path):
        return latest_path, False   # requeued after timeout/preemption: continue this run, not read_checkpoint
    if meta.load_checkpoint:        # (requeued before the first checkpoint: start as the first job did)
        return (os.path.join(folder, meta.read_checkpoint) if meta.read_checkpoint else latest_path), True
    if meta.auto_resume and os.path.exists(latest_path):
        return latest_path, False
    return None, False


# The keys a run may change when it continues (a checkpoint in its logging.folder): how long it trains, where and how
# it runs, what it logs and evaluates. A change to any other key (method, model, seed, masks, DSeq-JEPA, data,
# optimisation) makes it another run, whose results would be filed under this one's weights.
CONTINUE_KEYS = ('meta.load_checkpoint', 'meta.read_checkpoint', 'meta.auto_resume', 'meta.copy_data',
                 'meta.use_bfloat16', 'meta.bfloat16_on_cpu', 'optimization.epochs', 'optimization.max_steps',
                 'data.batch_size', 'data.num_workers', 'data.pin_mem', 'data.root_path', 'logging.', 'evaluation.')


def check_resume(cfg, path, by_name=False, world_size=None, warn=True):
    """Compare `cfg` with the config saved in the checkpoint `path` (ijepa's checkpoints have none). Raises
    ConfigError when a checkpoint found in logging.folder was trained with keys outside CONTINUE_KEYS (e.g. an
    I-JEPA run's folder given to a DSeq-JEPA config, another seed or another learning rate): continuing it would
    silently mix two runs. With `warn`, logs the allowed changes (and any change to a checkpoint asked for by name,
    meta.load_checkpoint), and a change of world size, which changes the iterations per epoch and so the schedules."""
    def flat(d, prefix=''):
        items = {}
        for k, v in d.items():
            items.update(flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
        return items
    checkpoint = torch_load(path, mmap=True)
    stored = checkpoint.get('config')
    if not stored:
        return
    old, new = flat(stored), flat(cfg.to_dict())
    changed = [k for k in new if k in old and old[k] != new[k]]    # keys added since the checkpoint: not compared
    other_run = [k for k in changed if not k.startswith(CONTINUE_KEYS)
                 and not (k.startswith('dseq.') and cfg.meta.method != 'dseq')]   # (I-JEPA ignores dseq keys)
    if other_run and not by_name:
        raise ConfigError(
            f'{path} is the checkpoint of another run (' + ', '.join(f'{k}: {old[k]!r} there, {new[k]!r} here'
                                                                    for k in other_run) +
            '): give this config its own logging.folder, or set meta.auto_resume: false to start over in this one')
    if warn and changed:
        logger.warning(f'continuing {path} with changed keys: ' +
                       ', '.join(f'{k}: {old[k]!r} -> {new[k]!r}' for k in changed))
    stored_world = checkpoint.get('world_size')
    if warn and world_size is not None and stored_world is not None and stored_world != world_size:
        logger.warning(f'continuing {path}, trained on {stored_world} processes, on {world_size}: the iterations per '
                       'epoch change, and with them the schedules (lr, wd, EMA, the curriculum) from this step on')


def preflight(cfg, check_data=True):
    """The start-up checks beyond the config's keys and types (SPEC section 7), for a launcher to run before it
    starts processes or submits jobs: the masks can be drawn (the collator's own checks of the mask settings), a
    checkpoint in logging.folder that the run would continue is one of its own (`check_resume`) and, with
    `check_data`, the data set is where `data.root_path` says. Raises ConfigError."""
    from src.datasets import missing_data
    from src.masks.multiblock import MaskSettingsError
    try:
        objective_class(cfg).make_collator(cfg)
    except MaskSettingsError as e:
        raise ConfigError(str(e)) from e
    path, by_name = resume_path(cfg)
    if path is not None and not by_name:
        check_resume(cfg, path, warn=False)           # the run itself says what it continues with
    problem = missing_data(cfg.data) if check_data else None
    if problem:
        raise ConfigError(problem)


def main(args, resume_preempt=False, device=None):
    """Train with the config `args` (a dict as read from yaml, or a Config). ijepa's entry point."""
    cfg = args if isinstance(args, Config) else parse_config(args)
    world_size, rank = init_distributed()
    device = torch.device(device) if device is not None else default_device()
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if rank > 0:
        logger.setLevel(logging.ERROR)
    meta, data, opt_cfg, log_cfg = cfg.meta, cfg.data, cfg.optimization, cfg.logging

    # -- paths; the resolved config is written beside the checkpoints, once
    folder, tag = log_cfg.folder, log_cfg.write_tag
    os.makedirs(folder, exist_ok=True)
    log_file = os.path.join(folder, f'{tag}_r{rank}.csv')
    latest_path = latest_checkpoint(folder, tag)
    rank_latest_path = latest_path if rank == 0 else os.path.join(folder, f'{tag}-latest_r{rank}.pth.tar')
    load_path, by_name = resume_path(cfg, resume_preempt)
    if load_path is not None and os.path.exists(load_path):       # (a missing named checkpoint fails below)
        check_resume(cfg, load_path, by_name, world_size)          # before this run writes into the folder
    if rank == 0:
        dump_config(cfg, os.path.join(folder, f'params-{tag}.yaml'))

    # -- model; the target encoder is an EMA copy of the context encoder
    torch.manual_seed(meta.seed)
    encoder, predictor = init_model(
        device=device, patch_size=cfg.mask.patch_size, crop_size=data.crop_size, pred_depth=meta.pred_depth,
        pred_emb_dim=meta.pred_emb_dim, model_name=meta.model_name, use_cls_token=meta.use_cls_token,
        init_rescale=meta.init_rescale)
    target_encoder = copy.deepcopy(encoder)
    for p in target_encoder.parameters():
        p.requires_grad = False

    # -- data
    transform = make_transforms(
        crop_size=data.crop_size, crop_scale=data.crop_scale, gaussian_blur=data.use_gaussian_blur,
        horizontal_flip=data.use_horizontal_flip, color_distortion=data.use_color_distortion,
        color_jitter=data.color_jitter_strength, normalization=data.normalization)
    collator = objective_class(cfg).make_collator(cfg, rank)
    loader = TrainLoader(make_dataset(data, transform), data.batch_size, collator, world_size=world_size,
                         rank=rank, seed=meta.seed, num_workers=data.num_workers, pin_mem=data.pin_mem)
    ipe = len(loader)
    if hasattr(collator, 'set_total_steps'):      # e.g. DSeq-JEPA's curriculum spans the whole run
        collator.set_total_steps(ipe * opt_cfg.epochs)

    # -- optimiser and schedules
    optimizer, scaler, _, _ = init_opt(
        encoder=encoder, predictor=predictor, wd=opt_cfg.weight_decay, final_wd=opt_cfg.final_weight_decay,
        start_lr=opt_cfg.start_lr, ref_lr=opt_cfg.lr, final_lr=opt_cfg.final_lr, iterations_per_epoch=ipe,
        warmup=opt_cfg.warmup, num_epochs=opt_cfg.epochs, ipe_scale=opt_cfg.ipe_scale,
        use_bfloat16=meta.use_bfloat16)
    schedules = Schedules(cfg, ipe)
    use_bf16 = (meta.use_bfloat16 and device.type == 'cuda') or (meta.bfloat16_on_cpu and device.type == 'cpu')

    # -- resume
    step = 0
    if load_path is not None:
        extras = {}
        load_checkpoint(device, load_path, encoder, predictor, target_encoder, optimizer, scaler, extras=extras)
        step = extras.get('step', extras_epoch_steps(extras, ipe))
        logger.info(f'resuming from {load_path} at step {step} (epoch {step // ipe + 1}, itr {step % ipe})')
    _trim_csv(log_file, step, ipe)
    last_step = ipe * opt_cfg.epochs
    if opt_cfg.max_steps is not None:
        last_step = min(last_step, opt_cfg.max_steps)

    if world_size > 1:
        encoder = DistributedDataParallel(encoder, static_graph=True)
        predictor = DistributedDataParallel(predictor, static_graph=True)
    objective = make_objective(cfg, encoder, predictor, target_encoder)
    train_step = TrainStep(objective, optimizer, scaler, schedules, encoder, target_encoder, device, use_bf16,
                           seed=meta.seed, rank=rank)

    csv_logger = CSVLogger(log_file, *IJEPA_COLUMNS, ('%.3e', 'lr'), ('%.3e', 'wd'),
                           *[('%.5f', c) for c in objective.csv_columns])
    timer = StepTimer(device)
    pending = []          # per-step (epoch, itr, loss tensor, stats) not yet written: no host sync in the step
    last_finite = {'loss': float('nan'), 'step': -1}
    epoch_loss = {'epoch': None, 'sum': 0., 'count': 0}   # ijepa's loss_meter: mean over the epoch's steps
    recent_ms = []

    def flush_logs():
        """Write pending CSV rows (one host sync); stop on a non-finite loss before anything is saved. Every rank
        flushes at the same steps: the losses are averaged over the ranks (as ijepa logs them), so the CSVs and
        the non-finite check agree on every rank."""
        if not pending:
            return None
        times = timer.flush()
        losses = AllReduce.apply(torch.stack([p[2] for p in pending]).float()).cpu().tolist()
        rows = []
        for (ep, itr, _, stats, lr, wd, s), loss, ms in zip(pending, losses, times):
            if not math.isfinite(loss):
                pending.clear()
                raise NonFiniteLossError(
                    f'non-finite loss {loss} at step {s} (epoch {ep}, itr {itr}); last finite loss '
                    f'{last_finite["loss"]:.5f} at step {last_finite["step"]}; the last good checkpoint '
                    f'({latest_path}) was left untouched')
            last_finite.update(loss=loss, step=s)
            if epoch_loss['epoch'] != ep:
                epoch_loss.update(epoch=ep, sum=0., count=0)
            epoch_loss['sum'] += loss
            epoch_loss['count'] += 1
            rows.append((ep, itr, loss, float(stats['mask-A']), float(stats['mask-B']), ms, lr, wd,
                         *[float(stats[c]) for c in objective.csv_columns]))
        csv_logger.log_rows(rows)
        recent_ms.extend(times)
        del recent_ms[:-50]
        pending.clear()
        return rows

    def epoch_mean_loss():
        return epoch_loss['sum'] / epoch_loss['count'] if epoch_loss['count'] else float('nan')

    saved = {'step': None}

    def checkpoint(step, epoch_done):
        flush_logs()
        if saved['step'] == step or (rank > 0 and not log_cfg.save_all_ranks):
            return
        saved['step'] = step
        state = {
            'encoder': unwrap(encoder).state_dict(),
            'predictor': unwrap(predictor).state_dict(),
            'target_encoder': target_encoder.state_dict(),
            'opt': optimizer.state_dict(),
            'scaler': None if scaler is None else scaler.state_dict(),
            'epoch': step // ipe,
            'loss': epoch_mean_loss(),          # as ijepa's: mean over the epoch's steps (since start or resume)
            'batch_size': data.batch_size,
            'world_size': world_size,
            'lr': opt_cfg.lr,
            'step': step,
            'itr': step % ipe,
            'method': meta.method,
            'config': cfg.to_dict(),
        }
        save_checkpoint(rank_latest_path, state)
        if rank == 0 and epoch_done and (step // ipe) % log_cfg.checkpoint_freq == 0:
            save_checkpoint(os.path.join(folder, f'{tag}-ep{step // ipe}.pth.tar'), state)

    logger.info(f'{meta.method}: {ipe} iterations per epoch, {opt_cfg.epochs} epochs, training steps '
                f'{step}..{last_step} on {device} x {world_size}; log: {log_file}')
    start_time, start_step = time.time(), step
    while step < last_step:
        epoch, start_itr = step // ipe, step % ipe
        for itr, batch in enumerate(loader.epoch(epoch, start_itr, step), start=start_itr):
            t0 = timer.start()
            log_now = (itr % log_cfg.log_freq == 0)
            loss, stats, (lr, wd, m), grad_stats = train_step(batch, step, with_grad_stats=log_now)

            # -- logging (host sync only here, every log_freq steps)
            timer.stop(t0)
            pending.append((epoch + 1, itr, loss, stats, lr, wd, step))
            step += 1
            if log_now or step == last_step:
                flush_logs()
                ms = sum(recent_ms) / max(1, len(recent_ms))
                eta = (last_step - step) * (time.time() - start_time) / max(1, step - start_step)
                logger.info(f'[{epoch + 1}, {itr:5d}] loss: {last_finite["loss"]:.4f} '
                            f'masks: {stats["mask-A"]:.1f} {stats["mask-B"]:.1f} [lr: {lr:.2e}] [wd: {wd:.2e}] '
                            f'[m: {m:.4f}] ({ms:.1f} ms/step, eta {_hms(eta)})'
                            + (f' [grad: {grad_stats.first_layer:.2e} {grad_stats.last_layer:.2e}]'
                               if grad_stats is not None else ''))
            if log_cfg.checkpoint_steps and step % log_cfg.checkpoint_steps == 0:
                checkpoint(step, epoch_done=(step % ipe == 0))
            if step >= last_step:
                break
        if step % ipe == 0 or step >= last_step:
            checkpoint(step, epoch_done=(step % ipe == 0))
            logger.info(f'epoch {epoch + 1} done at step {step}: avg. loss {epoch_mean_loss():.4f}; '
                        f'checkpoint {latest_path}')
    logger.info(f'training finished at step {step}; log: {log_file}; checkpoint: {latest_path}')
    evaluation = None
    if rank == 0 and cfg.evaluation.fname:
        from evals.scaffold import evaluate_checkpoint
        evaluation = evaluate_checkpoint(cfg.evaluation.fname, latest_path, os.path.join(folder, 'evals'),
                                         random_init=cfg.evaluation.random_init_baseline, device=device)
    return {'start_step': start_step, 'step': step, 'loss': last_finite['loss'], 'log_file': log_file,
            'checkpoint': latest_path, 'evaluation': evaluation}


def extras_epoch_steps(extras, ipe):
    """ijepa's checkpoints have no step: they were written at the end of epoch `epoch`."""
    return extras.get('epoch', 0) * ipe


def _hms(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
