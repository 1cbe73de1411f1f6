# Schedules as pure functions of the global step, so resuming needs only the step.
#
# They reproduce ijepa's schedule objects exactly: ijepa calls `step()` before each training step, so the value
# used at (0-based) global step t is the function evaluated at t + 1; the EMA momentum at step t is
# ema[0] + t * (ema[1] - ema[0]) / (ipe * epochs * ipe_scale).

import math


def warmup_cosine_lr(step, warmup_steps, start_lr, ref_lr, T_max, final_lr=0.):
    """Linear warmup from start_lr to ref_lr over `warmup_steps`, then cosine to final_lr at `T_max`."""
    if step < warmup_steps:
        progress = float(step) / float(max(1, warmup_steps))
        return start_lr + progress * (ref_lr - start_lr)
    progress = float(step - warmup_steps) / float(max(1, T_max - warmup_steps))
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1. + math.cos(math.pi * progress)))


def cosine_wd(step, ref_wd, T_max, final_wd=0.):
    """Cosine from ref_wd to final_wd at T_max, clamped at final_wd."""
    progress = step / T_max
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1. + math.cos(math.pi * progress))
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def linear_momentum(step, ema, total_steps):
    """EMA momentum rising linearly from ema[0] (step 0) to ema[1] (step total_steps), then staying there (with
    ipe_scale < 1 training outlasts total_steps: ijepa's momentum generator runs out there and stops the run)."""
    return ema[0] + min(step, total_steps) * (ema[1] - ema[0]) / total_steps


class WarmupCosineSchedule(object):
    """ijepa's LR schedule object; `step()` advances and writes the LR into every param group."""

    def __init__(self, optimizer, warmup_steps, start_lr, ref_lr, T_max, last_epoch=-1, final_lr=0.):
        self.optimizer = optimizer
        self.start_lr = start_lr
        self.ref_lr = ref_lr
        self.final_lr = final_lr
        self.warmup_steps = warmup_steps
        self.T_max = T_max                  # total steps, warmup included
        self._step = 0

    def value(self, step):
        return warmup_cosine_lr(step, self.warmup_steps, self.start_lr, self.ref_lr, self.T_max, self.final_lr)

    def step(self):
        self._step += 1
        new_lr = self.value(self._step)
        for group in self.optimizer.param_groups:
            group['lr'] = new_lr
        return new_lr


class CosineWDSchedule(object):
    """ijepa's weight-decay schedule object; groups marked `WD_exclude` keep weight decay 0."""

    def __init__(self, optimizer, ref_wd, T_max, final_wd=0.):
        self.optimizer = optimizer
        self.ref_wd = ref_wd
        self.final_wd = final_wd
        self.T_max = T_max
        self._step = 0

    def value(self, step):
        return cosine_wd(step, self.ref_wd, self.T_max, self.final_wd)

    def step(self):
        self._step += 1
        new_wd = self.value(self._step)
        for group in self.optimizer.param_groups:
            if not group.get('WD_exclude', False):
                group['weight_decay'] = new_wd
        return new_wd
