import os
import time

import torch


def gpu_timer(closure, log_timings=True):
    """Run `closure()`; return (result, elapsed ms) measured with CUDA events (-1 without CUDA), as in ijepa."""
    log_timings = log_timings and torch.cuda.is_available()
    elapsed_time = -1.
    if log_timings:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
    result = closure()
    if log_timings:
        end.record()
        torch.cuda.synchronize()
        elapsed_time = start.elapsed_time(end)
    return result, elapsed_time


class CSVLogger(object):
    """Append rows to a CSV file; the header is written once, when the file is new (so a resumed run appends)."""

    def __init__(self, fname, *argv):
        self.fname = fname
        self.types = [fmt for fmt, _ in argv]
        os.makedirs(os.path.dirname(os.path.abspath(fname)), exist_ok=True)
        if not os.path.exists(fname) or os.path.getsize(fname) == 0:
            with open(fname, 'a') as f:
                print(','.join(name for _, name in argv), file=f)

    def log(self, *argv):
        self.log_rows([argv])

    def log_rows(self, rows):
        with open(self.fname, 'a') as f:
            for row in rows:
                print(','.join(fmt % v for fmt, v in zip(self.types, row)), file=f)


class AverageMeter(object):
    """computes and stores the average and current value"""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = 0
        self.avg = 0
        self.max = float('-inf')
        self.min = float('inf')
        self.sum = 0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.max = max(val, self.max)
        self.min = min(val, self.min)
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def grad_logger(named_params):
    """Gradient norms of weight matrices: first and last qkv layer, min and max (ijepa's grad_stats)."""
    stats = AverageMeter()
    stats.first_layer = None
    stats.last_layer = None
    for n, p in named_params:
        if (p.grad is not None) and not (n.endswith('.bias') or len(p.shape) == 1):
            grad_norm = float(torch.norm(p.grad.data))
            stats.update(grad_norm)
            if 'qkv' in n:
                stats.last_layer = grad_norm
                if stats.first_layer is None:
                    stats.first_layer = grad_norm
    if stats.first_layer is None or stats.last_layer is None:
        stats.first_layer = stats.last_layer = 0.
    return stats


class StepTimer:
    """Per-step wall time that does not synchronise the device inside the step.

    On CUDA each step records a pair of events, read only when `flush()` is called (at the log interval);
    on CPU the work is synchronous and perf_counter is exact.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'
        self._pending = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((start, ev))
        else:
            self._pending.append((time.perf_counter() - start) * 1000.)

    def flush(self):
        """Elapsed ms of every step since the last flush (synchronises on CUDA)."""
        if self.cuda and self._pending:
            self._pending[-1][1].synchronize()
            out = [s.elapsed_time(e) for s, e in self._pending]
        else:
            out = list(self._pending)
        self._pending = []
        return out


class Elapsed:
    """Milliseconds between two points of a step, read later: `float(elapsed)` synchronises (on CUDA) only then,
    so a statistic can be logged at the log interval without a host sync inside the step."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin, self.ms = time.perf_counter(), None

    def stop(self):
        if self.cuda:
            self.end.record()
        else:
            self.ms = (time.perf_counter() - self.begin) * 1000.
        return self

    def __float__(self):
        if self.cuda:
            self.end.synchronize()
            return float(self.begin.elapsed_time(self.end))
        return float(self.ms)

    def __format__(self, spec):
        return format(float(self), spec)
