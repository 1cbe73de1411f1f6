"""Training loop: checkpoints with ijepa's keys, CSV columns, bit-for-bit resume, non-finite loss, schedules."""
import math
import os

import pytest
import torch

from src.objectives.ijepa import IJEPA
from src.train import NonFiniteLossError, main as train_main
from src.utils.schedulers import CosineWDSchedule, WarmupCosineSchedule
from tests.helpers import load, read_csv, tiny_params, train_straight_and_resumed

pytestmark = pytest.mark.timeout(180)

IJEPA_KEYS = {'encoder', 'predictor', 'target_encoder', 'opt', 'scaler', 'epoch', 'loss', 'batch_size',
              'world_size', 'lr'}


def test_checkpoint_and_csv_follow_ijepa(tmp_path):
    out = train_main(tiny_params(tmp_path, **{'optimization.max_steps': 5}))
    assert out['step'] == 5
    ckpt = load(tmp_path / 'jepa-latest.pth.tar')
    assert IJEPA_KEYS <= set(ckpt)
    assert ckpt['step'] == 5 and ckpt['world_size'] == 1 and ckpt['batch_size'] == 8
    assert not any(k.startswith('module.') for k in ckpt['encoder'])
    assert {'patch_embed.proj.weight', 'pos_embed', 'blocks.0.attn.qkv.weight', 'norm.weight'} <= set(ckpt['encoder'])
    assert {'predictor_embed.weight', 'mask_token', 'predictor_pos_embed', 'predictor_proj.weight'} \
        <= set(ckpt['predictor'])
    header, rows = read_csv(tmp_path / 'jepa_r0.csv')
    assert header[:6] == ['epoch', 'itr', 'loss', 'mask-A', 'mask-B', 'time (ms)']
    assert [int(r['itr']) for r in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(float(r['loss'])) for r in rows)
    # as ijepa's loss_meter.avg: the mean over the epoch's steps (all 5 are in epoch 1), not the last step's
    assert ckpt['loss'] == pytest.approx(sum(float(r['loss']) for r in rows) / 5, abs=1e-4)
    assert ckpt['loss'] != pytest.approx(float(rows[-1]['loss']), abs=1e-4)
    assert (tmp_path / 'params-jepa.yaml').exists()


def test_loss_falls(tmp_path):
    train_main(tiny_params(tmp_path, **{'optimization.epochs': 4}))      # 32 steps
    _, rows = read_csv(tmp_path / 'jepa_r0.csv')
    losses = [float(r['loss']) for r in rows]
    assert len(losses) == 32
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_is_bit_for_bit(tmp_path, num_workers):
    """N steps straight == N/2 steps, stop, resume, N/2 steps (mid-epoch: 8 batches per epoch)."""
    def params(folder, steps):
        return tiny_params(folder, **{'data.num_workers': num_workers, 'optimization.max_steps': steps})
    rows_a, rows = train_straight_and_resumed(train_main, params, tmp_path, steps=10, split_at=5)
    # the resumed CSV holds each step once, in order
    assert [(int(r['epoch']), int(r['itr'])) for r in rows] == [(1 + s // 8, s % 8) for s in range(10)]
    assert [r['loss'] for r in rows] == [r['loss'] for r in rows_a]


def test_resume_after_kill_drops_rows_past_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 4 logged more rows; resuming keeps the CSV consistent."""
    train_main(tiny_params(tmp_path, **{'optimization.max_steps': 6, 'logging.checkpoint_steps': 4}))
    ckpt = load(tmp_path / 'jepa-latest.pth.tar')
    assert ckpt['step'] == 6
    # simulate the kill: the latest checkpoint is the step-4 one, the log went on to step 6
    train_main(tiny_params(tmp_path / 'b', **{'optimization.max_steps': 4}))
    os.replace(tmp_path / 'b' / 'jepa-latest.pth.tar', tmp_path / 'jepa-latest.pth.tar')
    assert train_main(tiny_params(tmp_path, **{'optimization.max_steps': 8}))['start_step'] == 4
    _, rows = read_csv(tmp_path / 'jepa_r0.csv')
    assert [int(r['itr']) for r in rows] == list(range(8))


def test_resume_after_a_kill_mid_row_drops_the_partial_row(tmp_path):
    """Killed while writing a CSV row: the resumed run drops the cut line and logs each step once."""
    train_main(tiny_params(tmp_path, **{'optimization.max_steps': 4}))
    with open(tmp_path / 'jepa_r0.csv', 'a') as f:
        f.write('1,')                                                # no newline: the kill came here
    assert train_main(tiny_params(tmp_path, **{'optimization.max_steps': 6}))['start_step'] == 4
    _, rows = read_csv(tmp_path / 'jepa_r0.csv')
    assert [int(r['itr']) for r in rows] == list(range(6))
    assert all(math.isfinite(float(r['time (ms)'])) for r in rows)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    original = IJEPA.__call__

    def poisoned(self, batch, step):
        loss, stats = original(self, batch, step)
        return (loss * float('nan') if step >= 5 else loss), stats

    monkeypatch.setattr(IJEPA, '__call__', poisoned)
    params = tiny_params(tmp_path, **{'logging.checkpoint_steps': 2, 'logging.log_freq': 4})
    with pytest.raises(NonFiniteLossError) as err:
        train_main(params)
    msg = str(err.value)
    assert 'step 5' in msg and 'jepa-latest.pth.tar' in msg and 'last finite loss' in msg
    ckpt = load(tmp_path / 'jepa-latest.pth.tar')
    assert ckpt['step'] == 4       # written before the NaN; the NaN at step 5 was caught before the step-6 save
    assert all(torch.isfinite(v).all() for v in ckpt['encoder'].values())


# ------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, equal to ijepa's objects stepped from the start (SPEC section 3)
# ------------------------------------------------------------------------------------------------------------

def reference_lr(t, warmup, start, ref, final, total):
    """The LR used at 0-based step t: ijepa steps its schedule before each step, so it evaluates t + 1."""
    s = t + 1
    if s < warmup:
        return start + (s / warmup) * (ref - start)
    progress = (s - warmup) / (total - warmup)
    return max(final, final + (ref - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedules_match_reference_and_objects():
    from src.config import parse_config
    from src.train import Schedules
    cfg = parse_config({'optimization': {'epochs': 3, 'warmup': 1, 'start_lr': 2e-4, 'lr': 1e-3, 'final_lr': 1e-6,
                                         'weight_decay': 0.04, 'final_weight_decay': 0.4, 'ema': [0.99, 1.0]},
                        'data': {'dataset': 'synthetic'}})
    ipe = 10
    sched = Schedules(cfg, ipe)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.)
    lr_obj = WarmupCosineSchedule(opt, warmup_steps=10, start_lr=2e-4, ref_lr=1e-3, T_max=30, final_lr=1e-6)
    wd_obj = CosineWDSchedule(opt, ref_wd=0.04, T_max=30, final_wd=0.4)
    for t in range(30):
        assert sched.lr(t) == pytest.approx(reference_lr(t, 10, 2e-4, 1e-3, 1e-6, 30), rel=1e-12)
        assert sched.lr(t) == lr_obj.step()
        assert sched.wd(t) == wd_obj.step()
        assert sched.momentum(t) == pytest.approx(0.99 + t * 0.01 / 30)
    assert sched.lr(9) == pytest.approx(1e-3)                  # end of warmup reaches the peak
    assert sched.wd(29) == pytest.approx(0.4)                  # weight decay rises to its final value


def test_momentum_stays_at_its_final_value_when_training_outlasts_the_schedule():
    """With ipe_scale < 1 the momentum schedule ends before training does: it then stays at ema[1] (moving
    past 1 would push the target encoder away from the online one)."""
    from src.config import parse_config
    from src.train import Schedules
    cfg = parse_config({'optimization': {'epochs': 4, 'ipe_scale': 0.5, 'ema': [0.99, 1.0]},
                        'data': {'dataset': 'synthetic'}})
    sched = Schedules(cfg, 10)                                  # 40 steps, momentum schedule over 20
    assert sched.momentum(10) == pytest.approx(0.995)
    assert [sched.momentum(t) for t in (20, 21, 39)] == [1.0, 1.0, 1.0]


def test_bfloat16_without_cuda_gets_a_disabled_scaler_and_resumes_on_an_enabled_one(tmp_path, monkeypatch):
    """As ijepa's init_opt, use_bfloat16 gives a GradScaler even without CUDA (disabled: it passes the loss and the
    step through), and a checkpoint that saved its empty state loads where a scaler is enabled."""
    from src.helper import init_model, init_opt, load_checkpoint, save_checkpoint
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)         # as on this machine, on any machine
    encoder, predictor = init_model('cpu', patch_size=8, model_name='vit_pico', crop_size=32, pred_depth=1,
                                    pred_emb_dim=16)
    optimizer, scaler, _, _ = init_opt(encoder, predictor, iterations_per_epoch=2, start_lr=1e-4, ref_lr=1e-3,
                                       warmup=1, num_epochs=1, use_bfloat16=True)
    assert scaler is not None and not scaler.is_enabled()
    loss = torch.tensor(2.5)
    assert scaler.scale(loss) is loss
    path = tmp_path / 'ckpt.pth.tar'
    save_checkpoint(path, {'encoder': encoder.state_dict(), 'predictor': predictor.state_dict(),
                           'target_encoder': encoder.state_dict(), 'opt': optimizer.state_dict(),
                           'scaler': scaler.state_dict(), 'epoch': 1})
    enabled = torch.amp.GradScaler('cpu', init_scale=8.)
    load_checkpoint('cpu', path, encoder, predictor, encoder, optimizer, enabled)
    assert enabled.get_scale() == 8.                            # nothing to load: its own state is kept


def test_a_checkpoint_of_another_run_in_the_folder_is_refused(tmp_path, caplog):
    """A/B by switching one key, but in the same logging.folder: the run must not continue the other run's
    checkpoint (with [CLS] on both, the weights would load without complaint)."""
    from src.config import ConfigError
    train_main(tiny_params(tmp_path, **{'optimization.max_steps': 2, 'meta.use_cls_token': True}))
    names = ('jepa_r0.csv', 'params-jepa.yaml', 'jepa-latest.pth.tar')
    before = {name: (tmp_path / name).read_bytes() for name in names}
    for change, key in (({'meta.method': 'dseq'}, 'meta.method'), ({'meta.seed': 1}, 'meta.seed'),
                        ({'mask.pred_mask_scale': [0.2, 0.3]}, 'mask.pred_mask_scale'),
                        ({'optimization.lr': 0.01}, 'optimization.lr'),
                        ({'data.limit_images': 32}, 'data.limit_images')):
        with pytest.raises(ConfigError, match=f"another run \\({key}: "):
            train_main(tiny_params(tmp_path, **{'optimization.max_steps': 4, 'meta.use_cls_token': True, **change}))
    assert {name: (tmp_path / name).read_bytes() for name in names} == before      # nothing written
    # the same run with a longer budget continues, saying what changed
    out = train_main(tiny_params(tmp_path, **{'optimization.max_steps': 4, 'meta.use_cls_token': True}))
    assert out['start_step'] == 2 and 'optimization.max_steps: 2 -> 4' in caplog.text
    # meta.auto_resume: false starts over in the folder
    out = train_main(tiny_params(tmp_path, **{'optimization.max_steps': 2, 'meta.use_cls_token': True,
                                              'meta.method': 'dseq', 'meta.auto_resume': False}))
    assert out['start_step'] == 0 and load(tmp_path / 'jepa-latest.pth.tar')['method'] == 'dseq'


def test_resume_check_reads_legacy_checkpoints_and_ignores_unused_dseq_keys(tmp_path, caplog):
    train_main(tiny_params(tmp_path, **{'optimization.max_steps': 2}))
    path = tmp_path / 'jepa-latest.pth.tar'
    torch.save(load(path), path, _use_new_zipfile_serialization=False)     # torch's legacy format: no mmap
    # an I-JEPA run does not read the dseq section: changing it is the same run
    out = train_main(tiny_params(tmp_path, **{'optimization.max_steps': 4, 'dseq.num_regions': 3}))
    assert out['start_step'] == 2 and 'dseq.num_regions: 5 -> 3' in caplog.text
