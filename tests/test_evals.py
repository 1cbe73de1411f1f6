# Tests of the frozen-encoder evaluations (evals/): encoder loading from every checkpoint form, the feature cache,
# k-NN and the linear probe against plain references, the dataset formats on generated fixtures, and the command.

import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from evals import knn, linear_probe
from evals.config import LinearConfig, load_eval_config
from evals.data import CUB200, FASHION_MNIST_TOPS, Relabelled
from evals.features import extract
from src.helper import init_model, load_encoder, save_checkpoint
from src.train import main as train_main
from tests.helpers import tiny_params, write_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures('one_thread')]


# --------------------------------------------------------------------------------------------------------------
# Encoder loading
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained_runs(tmp_path_factory):
    """Two tiny training runs of 2 steps (I-JEPA without [CLS], DSeq-JEPA with): their checkpoint paths."""
    runs = {}
    for method, cls in (('ijepa', False), ('dseq', True)):
        folder = tmp_path_factory.mktemp(method)
        train_main(tiny_params(folder, **{'meta.method': method, 'meta.use_cls_token': cls,
                                          'optimization.max_steps': 2}))
        runs[method] = str(folder / 'jepa-latest.pth.tar')
    return runs


@pytest.mark.parametrize('method', ['ijepa', 'dseq'])
@pytest.mark.parametrize('which', ['target_encoder', 'encoder'])
def test_load_encoder_from_our_checkpoints(trained_runs, method, which):
    path = trained_runs[method]
    checkpoint = torch.load(path, weights_only=True)
    encoder, info = load_encoder(path, which=which)
    assert info['use_cls_token'] == (method == 'dseq') and info['crop_size'] == 32 and info['patch_size'] == 8
    assert info['method'] == method and info['step'] == 2
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, checkpoint[which][name]), name
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_load_encoder_from_an_ijepa_style_checkpoint(tmp_path, trained_runs):
    """ijepa's released files: DDP 'module.' names and no config (the architecture must be given)."""
    ours = torch.load(trained_runs['ijepa'], weights_only=True)
    ijepa_like = {k: ours[k] for k in ('epoch', 'opt', 'scaler')}
    for k in ('encoder', 'predictor', 'target_encoder'):
        ijepa_like[k] = {f'module.{n}': v for n, v in ours[k].items()}
    path = str(tmp_path / 'IN1K-vit.pth.tar')
    save_checkpoint(path, ijepa_like)
    with pytest.raises(ValueError, match='model_name and patch_size'):
        load_encoder(path)
    encoder, info = load_encoder(path, model_name='vit_pico', patch_size=8)
    assert info['crop_size'] == 32 and not info['use_cls_token']
    x = torch.randn(2, 3, 32, 32)
    reference, _ = load_encoder(trained_runs['ijepa'])
    assert torch.equal(encoder(x), reference(x))
    with pytest.raises(RuntimeError, match='does not fit'):
        load_encoder(path, model_name='vit_nano', patch_size=8)


def test_random_init_encoder():
    encoder, info = load_encoder(None, model_name='vit_pico', patch_size=8, crop_size=32, use_cls_token=True)
    assert info['which'] == 'random_init' and encoder.cls_token is not None
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


# --------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------

def test_last4_pooling_equals_block_outputs_normalised_and_averaged():
    torch.manual_seed(0)
    encoder, _ = init_model('cpu', patch_size=8, model_name='vit_nano', crop_size=32)     # 4 blocks
    encoder.eval()
    imgs = torch.randn(5, 3, 32, 32)
    loader = [(imgs[:3], torch.tensor([0, 1, 2])), (imgs[3:], torch.tensor([3, 4]))]
    feats, labels = extract(encoder, loader, 'cpu', ('last', 'last4', 'tokens'))
    # reference: run the blocks by hand
    with torch.no_grad():
        x = encoder.prepare_tokens(imgs)
        outs = []
        for blk in encoder.blocks:
            x = blk(x)
            outs.append(encoder.norm(x).mean(dim=1))
        final = encoder.norm(x)
    assert torch.equal(labels, torch.arange(5))
    assert torch.allclose(feats['last4'], torch.cat(outs, dim=1), atol=1e-6)
    assert torch.allclose(feats['last'], final.mean(dim=1), atol=1e-6)
    assert feats['tokens'].dtype == torch.float16 and torch.allclose(feats['tokens'].float(), final, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------
# k-NN and the linear probe
# --------------------------------------------------------------------------------------------------------------

def ref_knn(train_x, train_y, test_x, k, T, C):
    """Per test point: cosine similarities, the k largest, votes exp(s / T) per class, the largest vote."""
    preds = []
    for q in test_x.tolist():
        sims = []
        for i, t in enumerate(train_x.tolist()):
            dot = sum(a * b for a, b in zip(q, t))
            sims.append((dot / (math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in t))), i))
        sims.sort(key=lambda s: -s[0])
        votes = [0.] * C
        for s, i in sims[:k]:
            votes[int(train_y[i])] += math.exp(s / T)
        preds.append(max(range(C), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize('chunk_size', [1, 7, 1000])
def test_knn_equals_reference(chunk_size):
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    preds = knn.knn_classify(train_x, train_y, test_x, k=5, temperature=0.07, num_classes=4, chunk_size=chunk_size)
    assert torch.equal(preds, ref_knn(train_x, train_y, test_x, 5, 0.07, 4))


def clusters(n, dim, classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linear_probe_separates_clusters_and_not_random_labels():
    x, y = clusters(600, 16, 5, 1.0, seed=0)
    xt, yt = clusters(300, 16, 5, 1.0, seed=1)
    cfg = LinearConfig(epochs=6, batch_size=64, milestones=(3, 5))
    top1, curve = linear_probe.train_linear(x, y, xt, yt, 5, cfg)
    assert top1 > 95 and len(curve) == 6 and curve[-1] == top1
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    chance, _ = linear_probe.train_linear(x, shuffled, xt, yt, 5, cfg)
    assert chance < 40                       # the probe cannot learn labels that carry no information


def test_linear_probe_follows_the_papers_schedule(monkeypatch):
    """SGD momentum 0.9, weight decay 5e-4, LR 0.01 x batch / 256, x0.1 at the milestones."""
    seen = []
    real_sgd = torch.optim.SGD

    def spy(params, **kw):
        opt = real_sgd(params, **kw)
        seen.append(opt)
        return opt
    monkeypatch.setattr(torch.optim, 'SGD', spy)
    lrs = []
    real_step = torch.optim.lr_scheduler.MultiStepLR.step

    def record(self, *a, **kw):
        lrs.append(self.optimizer.param_groups[0]['lr'])
        return real_step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.lr_scheduler.MultiStepLR, 'step', record)
    x, y = clusters(64, 4, 2, 1.0, seed=0)
    linear_probe.train_linear(x, y, x, y, 2, LinearConfig(epochs=28, batch_size=512))
    group = seen[0].param_groups[0]
    assert group['momentum'] == 0.9 and group['weight_decay'] == 5e-4
    base = 0.01 * 512 / 256
    expected = [base * 0.1 ** sum(e >= m for m in (8, 16, 24)) for e in range(28)]
    assert np.allclose(lrs[1:], expected)        # lrs[0]: the call in the constructor


def token_clusters(n, seed):
    """[n, 8, 16] tokens: noise, except one token at a random position that holds the class centre."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    tokens = torch.randn(n, 8, 16, generator=g)
    tokens[torch.arange(n), torch.randint(0, 8, (n,), generator=g)] = centres[y]
    return tokens.half(), y


def test_attentive_probe_finds_the_informative_token():
    from evals.attentive_probe import train_attentive
    from evals.config import AttentiveConfig
    x, y = token_clusters(400, seed=0)
    xt, yt = token_clusters(200, seed=1)
    cfg = AttentiveConfig(epochs=8, batch_size=32, lr=3e-3, num_heads=2)
    top1, curve = train_attentive(x, y, xt, yt, 3, cfg)
    assert top1 > 90 and len(curve) == 8
    chance, _ = train_attentive(x, y[torch.randperm(400, generator=torch.Generator().manual_seed(0))], xt, yt, 3, cfg)
    assert chance < 55


# --------------------------------------------------------------------------------------------------------------
# Datasets on generated fixtures
# --------------------------------------------------------------------------------------------------------------

class Labels(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return i, self.labels[i]


def test_fashion_mnist_tops_keeps_four_classes_relabelled():
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 0]
    tops = Relabelled(Labels(labels), labels, FASHION_MNIST_TOPS)
    assert [tops[i] for i in range(len(tops))] == [(0, 0), (2, 1), (4, 2), (6, 3), (10, 3), (11, 0)]


def write_cub(root, items):
    """items: (relative image path, 1-based class, is_train)."""
    os.makedirs(root / 'images', exist_ok=True)
    with open(root / 'images.txt', 'w') as fi, open(root / 'image_class_labels.txt', 'w') as fl, \
            open(root / 'train_test_split.txt', 'w') as fs:
        for n, (rel, cls, train) in enumerate(items, start=1):
            (root / 'images' / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (12, 10), (n * 20, 0, 0)).save(root / 'images' / rel)
            fi.write(f'{n} {rel}\n')
            fl.write(f'{n} {cls}\n')
            fs.write(f'{n} {int(train)}\n')


def test_cub200_reads_the_standard_folder(tmp_path):
    write_cub(tmp_path, [('001.Albatross/a.jpg', 1, True), ('001.Albatross/b.jpg', 1, False),
                         ('002.Auklet/c.jpg', 2, True), ('200.Wren/d.jpg', 200, False)])
    train, test = CUB200(str(tmp_path), train=True), CUB200(str(tmp_path), train=False)
    assert train.targets == [0, 1] and test.targets == [0, 199]
    img, label = test[1]
    assert img.size == (12, 10) and label == 199
    with pytest.raises(FileNotFoundError, match='image_class_labels.txt'):
        os.remove(tmp_path / 'image_class_labels.txt')
        CUB200(str(tmp_path))


def truncate_file(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_an_unreadable_evaluation_image_is_named(tmp_path):
    """A truncated image (PIL says only "image file is truncated") raises naming its file, in CUB-200 and in the
    ImageFolder evaluation sets."""
    from evals.config import EvalDataConfig
    from evals.data import DATASETS
    write_cub(tmp_path / 'cub', [('001.Albatross/a.jpg', 1, True), ('002.Auklet/c.jpg', 2, True)])
    truncate_file(tmp_path / 'cub' / 'images' / '002.Auklet' / 'c.jpg')
    cub = CUB200(str(tmp_path / 'cub'), train=True)
    cub[0]
    with pytest.raises(RuntimeError, match='cannot read image .*c.jpg'):
        cub[1]
    write_image_folder(tmp_path / 'folder', per_class=1)
    truncate_file(tmp_path / 'folder' / 'val' / 'bright' / '0.png')
    val = DATASETS['imagefolder'](EvalDataConfig(dataset='imagefolder', root_path=str(tmp_path / 'folder')), False,
                                  None)
    with pytest.raises(RuntimeError, match='cannot read image .*bright.0.png'):
        [val[i] for i in range(len(val))]


# --------------------------------------------------------------------------------------------------------------
# The command, end to end on a generated ImageFolder
# --------------------------------------------------------------------------------------------------------------

def write_image_folder(root, per_class=6):
    """Two classes a probe can tell apart: dark and bright images, with noise."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c, level in (('dark', 40), ('bright', 200)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(level + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{i}.png')


def folder_eval_config(tmp_path, evals, per_class=6, data=None, **sections):
    """Write the two-class image folder in tmp_path/data and an eval config on it: the config's path."""
    write_image_folder(tmp_path / 'data', per_class)
    data = {'dataset': 'imagefolder', 'root_path': str(tmp_path / 'data'), **(data or {})}
    return write_config(tmp_path / 'eval.yaml', {'evals': evals, 'data': data, **sections})


def test_evals_main_writes_results_and_reuses_cached_features(tmp_path, trained_runs, monkeypatch):
    config = folder_eval_config(tmp_path, ['knn', 'linear', 'linear_last', 'attentive'],
                                pretrain={'checkpoint': trained_runs['dseq']}, data={'batch_size': 5},
                                knn={'k': 3}, linear={'epochs': 4, 'batch_size': 4},
                                attentive={'epochs': 2, 'num_heads': 2}, logging={'folder': str(tmp_path / 'out')})
    from evals.main import main
    assert main(['--fname', config]) == 0
    with open(tmp_path / 'out' / 'evals.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['eval'] for r in rows] == ['knn', 'linear', 'linear_last', 'attentive']
    assert all(0 <= float(r['top1']) <= 100 and r['method'] == 'dseq' for r in rows)
    assert float(rows[0]['top1']) == 100.     # dark vs bright: any encoder's features separate them
    results = json.load(open(tmp_path / 'out' / 'evals.json'))
    assert len(results[1]['curve']) == 4
    assert len(os.listdir(tmp_path / 'out' / 'features')) == 2            # train and test, cached
    # a second run reads the cache: extraction must not run again
    import evals.features as features
    monkeypatch.setattr(features, 'extract', lambda *a, **k: pytest.fail('features were recomputed'))
    assert main(['--fname', config]) == 0
    # random init: the same architecture, evaluated without a cache
    monkeypatch.undo()
    assert main(['--fname', config, '--random-init', '--folder', str(tmp_path / 'random')]) == 0
    with open(tmp_path / 'random' / 'evals.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['which'] for r in rows] == ['random_init'] * 4 and not (tmp_path / 'random' / 'features').exists()


def test_evals_config_errors_name_the_key(tmp_path):
    from src.config import ConfigError
    bad = write_config(tmp_path / 'bad.yaml', {'evals': ['knn'], 'knn': {'kk': 3}})
    with pytest.raises(ConfigError, match='knn.kk'):
        load_eval_config(bad)
    bad = write_config(tmp_path / 'bad2.yaml', {'evals': ['svm']})
    with pytest.raises(ConfigError, match='evals'):
        load_eval_config(bad)
    bad = write_config(tmp_path / 'bad3.yaml', {'evals': ['knn'], 'pretrain': {'checkpoint': None}})
    with pytest.raises(ConfigError, match='model_name'):
        load_eval_config(bad)
    # settings that would fail only after feature extraction, or silently (a probe of one row per batch never
    # trains: BatchNorm skips it)
    for key, value in [('linear.batch_size', 1), ('knn.chunk_size', 0), ('data.limit_train', 0),
                       ('data.resolution', 0), ('linear.lr', -1.)]:
        section, name = key.split('.')
        bad = write_config(tmp_path / 'bad4.yaml', {'evals': ['knn'], section: {name: value}})
        with pytest.raises(ConfigError, match=key):
            load_eval_config(bad)


def test_evals_main_writes_beside_the_checkpoint_and_the_baseline_apart(tmp_path, trained_runs):
    """With --checkpoint (and no --folder) the results go to evals/ beside it, not to the config's folder (which
    names another run's); --random-init goes to evals/random_init and leaves the checkpoint's results alone."""
    import shutil
    run = tmp_path / 'run'
    run.mkdir()
    checkpoint = shutil.copy(trained_runs['ijepa'], run / 'jepa-latest.pth.tar')
    config = folder_eval_config(tmp_path, ['knn'], data={'batch_size': 5}, knn={'k': 3},
                                logging={'folder': str(tmp_path / 'other_run' / 'evals')})
    from evals.main import main
    assert main(['--fname', config, '--checkpoint', str(checkpoint)]) == 0
    results = (run / 'evals' / 'evals.json').read_text()
    assert main(['--fname', config, '--checkpoint', str(checkpoint), '--random-init']) == 0
    assert (run / 'evals' / 'evals.json').read_text() == results
    assert 'random_init' in (run / 'evals' / 'random_init' / 'evals.json').read_text()
    assert not (tmp_path / 'other_run').exists()
    with pytest.raises(SystemExit, match='error: .*not found'):            # a clean error, not a traceback
        main(['--fname', config, '--checkpoint', str(tmp_path / 'none.pth.tar'), '--random-init'])


def test_training_ends_with_the_evaluation_of_its_checkpoint(tmp_path, capsys):
    eval_config = folder_eval_config(tmp_path, ['knn', 'linear'], data={'batch_size': 8}, knn={'k': 3},
                                     linear={'epochs': 2, 'batch_size': 4})
    out = train_main(tiny_params(tmp_path / 'run', **{'optimization.max_steps': 2,
                                                      'evaluation.fname': eval_config,
                                                      'evaluation.random_init_baseline': True}))
    results = out['evaluation']
    assert [r['eval'] for r in results['pretrained']] == ['knn', 'linear']
    assert all(r['checkpoint'] == out['checkpoint'] and r['step'] == 2 for r in results['pretrained'])
    assert [r['which'] for r in results['random_init']] == ['random_init'] * 2
    assert os.path.isfile(tmp_path / 'run' / 'evals' / 'evals.csv')
    assert os.path.isfile(tmp_path / 'run' / 'evals' / 'random_init' / 'evals.csv')
    printed = capsys.readouterr().out
    assert 'knn: top-1' in printed and '(random init:' in printed


def test_a_bad_evaluation_config_stops_training_at_start_up(tmp_path):
    from src.config import ConfigError, parse_config
    bad = write_config(tmp_path / 'eval.yaml', {'evals': ['knn'], 'knn': {'k': 'many'}})
    with pytest.raises(ConfigError, match='evaluation.fname.*knn.k'):
        parse_config(tiny_params(tmp_path, **{'evaluation.fname': bad}))


# --------------------------------------------------------------------------------------------------------------
# A/B comparison
# --------------------------------------------------------------------------------------------------------------

def test_ab_statistics_equal_scipys_welch_test():
    from scipy import stats
    from evals.ab import compare
    a, b = [70.1, 71.3, 69.8], [72.4, 73.9, 72.0, 74.2]
    rows = compare({'A': {'linear': a}, 'B': {'linear': b}})
    ra, rb = rows
    assert ra['group'] == 'A' and 'diff' not in ra
    assert math.isclose(ra['mean'], np.mean(a)) and math.isclose(rb['std'], np.std(b, ddof=1))
    ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert math.isclose(rb['diff'], np.mean(b) - np.mean(a))
    assert math.isclose(rb['ci_low'], ci.low, rel_tol=1e-9) and math.isclose(rb['ci_high'], ci.high, rel_tol=1e-9)
    # no spread in either group (identical runs): no interval, rather than one of zero width
    same = compare({'A': {'linear': [70., 70.]}, 'B': {'linear': [71., 71.]}})[1]
    assert same['diff'] == 1. and math.isnan(same['ci_low']) and math.isnan(same['ci_high'])


def test_ab_command_writes_table_and_plot_and_reuses_results(tmp_path, monkeypatch):
    eval_config = folder_eval_config(tmp_path, ['knn', 'linear'], data={'batch_size': 8}, knn={'k': 3},
                                     linear={'epochs': 3, 'batch_size': 4})
    runs = {}
    for method, cls in (('ijepa', False), ('dseq', True)):
        for seed in (0, 1):
            folder = tmp_path / f'{method}_s{seed}'
            train_main(tiny_params(folder, **{'meta.method': method, 'meta.use_cls_token': cls, 'meta.seed': seed,
                                              'optimization.max_steps': 3, 'logging.log_freq': 1}))
            runs.setdefault(method, []).append(str(folder))
    from evals.ab import main
    args = ['--fname', eval_config, '--group', 'ijepa', *runs['ijepa'], '--group', 'dseq', *runs['dseq'],
            '--out', str(tmp_path / 'report')]
    assert main(args) == 0
    with open(tmp_path / 'report' / 'ab.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(r['eval'], r['group'], r['n']) for r in rows] == [('knn', 'ijepa', '2'), ('knn', 'dseq', '2'),
                                                               ('linear', 'ijepa', '2'), ('linear', 'dseq', '2')]
    assert rows[0]['diff'] == '' and rows[1]['diff'] != ''
    assert {r['step'] for r in rows} == {'3'}
    table = open(tmp_path / 'report' / 'ab.md').read()
    assert table.startswith('| evaluation | group |') and '| linear | dseq | 2 | 3 |' in table
    png = Image.open(tmp_path / 'report' / 'ab.png')
    assert png.size[0] > 500 and png.size[1] > 200
    # every run now has its results: a second comparison evaluates nothing
    import evals.scaffold as scaffold
    monkeypatch.setattr(scaffold, 'run', lambda *a, **k: pytest.fail('a run was evaluated again'))
    assert main(args) == 0
    with pytest.raises(SystemExit, match='at least two'):
        main(['--fname', eval_config, '--group', 'ijepa', *runs['ijepa'], '--out', str(tmp_path / 'r2')])
    with pytest.raises(SystemExit, match='is given twice'):
        main(['--fname', eval_config, '--group', 'ijepa', runs['ijepa'][0], runs['ijepa'][0], '--group', 'dseq',
              *runs['dseq'], '--out', str(tmp_path / 'r6')])
    with pytest.raises(SystemExit, match="two groups are named 'dseq'"):
        main(['--fname', eval_config, '--group', 'dseq', runs['dseq'][0], '--group', 'dseq', runs['dseq'][1],
              '--out', str(tmp_path / 'r3')])
    # a seed stopped early is not averaged with finished ones
    short = tmp_path / 'dseq_short'
    train_main(tiny_params(short, **{'meta.method': 'dseq', 'meta.use_cls_token': True, 'optimization.max_steps': 2,
                                     'logging.log_freq': 1}))
    with pytest.raises(SystemExit, match=r'group dseq mixes checkpoints of different training steps \[2, 3\]'):
        main(['--fname', eval_config, '--group', 'ijepa', *runs['ijepa'], '--group', 'dseq', runs['dseq'][0],
              str(short), '--out', str(tmp_path / 'r4')])
    os.remove(short / 'jepa_r0.csv')          # no training log: said before anything is evaluated
    monkeypatch.setattr(scaffold, 'run', lambda *a, **k: pytest.fail('evaluated before the check'))
    with pytest.raises(SystemExit, match='no jepa_r0.csv'):
        main(['--fname', eval_config, '--group', 'ijepa', *runs['ijepa'], '--group', 'dseq', str(short),
              '--out', str(tmp_path / 'r5')])
    assert not (tmp_path / 'r5').exists()


def test_ab_step_of_legacy_and_ijepa_checkpoints(tmp_path, trained_runs):
    from evals.ab import step_and_seed
    checkpoint = torch.load(trained_runs['ijepa'], weights_only=True)
    torch.save(checkpoint, tmp_path / 'jepa-latest.pth.tar', _use_new_zipfile_serialization=False)
    assert step_and_seed(str(tmp_path))[0] == 2
    del checkpoint['step']                                  # ijepa's checkpoints record the epoch only
    torch.save(checkpoint, tmp_path / 'jepa-latest.pth.tar')
    assert step_and_seed(str(tmp_path))[0] == f'epoch {checkpoint["epoch"]}'


def test_ab_loss_steps_come_from_the_csvs_epoch_and_itr(tmp_path):
    from evals.ab import read_losses
    rows = [(1, 0), (1, 10), (1, 20), (2, 0), (2, 10), (2, 20), (3, 0)]      # ijepa logs every log_freq = 10 steps
    with open(tmp_path / 'jepa_r0.csv', 'w') as f:
        f.write('epoch,itr,loss,mask-A,mask-B,time (ms)\n')
        f.writelines(f'{e},{i},{0.5 / (1 + k):.5f},10,12,100\n' for k, (e, i) in enumerate(rows))
    steps, losses = read_losses(str(tmp_path))
    assert steps == [0, 10, 20, 21, 31, 41, 42]                             # 21 iterations per epoch
    assert losses[0] == 0.5 and len(losses) == len(rows)
    with open(tmp_path / 'jepa_r0.csv', 'a') as f:
        f.write('3,10,0.0')                                                 # cut short by a kill
    assert read_losses(str(tmp_path)) == (steps, losses)


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------

def test_kmeans_recovers_separated_clusters():
    from evals.figures import kmeans
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 40), generator=g)
    centres = torch.eye(4, 6) * 10
    x = centres[labels] + 0.1 * torch.randn(3, 40, 6, generator=g)
    found = kmeans(x, k=4)
    for b in range(3):      # the same partition, up to the cluster numbering
        pairs = set(zip(labels[b].tolist(), found[b].tolist()))
        assert len(pairs) == len(set(labels[b].tolist())) == len({f for _, f in pairs})


def test_figures_for_a_dseq_checkpoint(tmp_path, trained_runs):
    from evals.figures import dseq_settings, make_figures, regions_of
    config = folder_eval_config(tmp_path, ['knn'])
    for method in ('dseq', 'ijepa'):        # I-JEPA (no [CLS]): column_mean saliency
        paths = make_figures(trained_runs[method], config, str(tmp_path / method), num_images=3)
        for path in paths:
            png = Image.open(path)
            assert png.size[0] > 150 and png.size[1] > 150
    encoder, _ = load_encoder(trained_runs['dseq'])
    cfg, mask, block = dseq_settings(trained_runs['dseq'], encoder)
    assert cfg.saliency == 'cls_similarity' and block == 2
    imgs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, saliency, regions, is_rest = regions_of(encoder, imgs, cfg, block, mask)
    assert regions.shape == (6, cfg.num_regions, 16) and saliency.shape == (6, 16)
    assert (regions.sum(dim=1) == 1).all()          # disjoint, covering the image
    assert is_rest[:, -1].all() and not is_rest[:, :-1].any()      # grey: the background, last
    # the figure follows the checkpoint's variant as the step does: truncation keeps the first k non-empty regions
    _, _, cut, cut_rest = regions_of(encoder, imgs, dataclasses.replace(cfg, truncate_regions=2), block, mask)
    assert cut.shape == (6, 2, 16)
    for b in range(6):
        kept = [r for r in regions[b] if r.any()][:2]
        assert [r.tolist() for r in cut[b] if r.any()] == [r.tolist() for r in kept]
        assert cut_rest[b].tolist() == [bool(r.any()) and torch.equal(r, regions[b, -1]) for r in cut[b]]
    # the 'blocks' generator: the context (the rest of the image, grey) comes first, then the scored boxes
    _, _, blocks, blocks_rest = regions_of(encoder, imgs, dataclasses.replace(cfg, regions='blocks'), block, mask)
    assert (blocks.sum(dim=1) == 1).all() and blocks_rest[:, 0].all() and not blocks_rest[:, 1:].any()
    assert (blocks[:, 1:].any(dim=2).sum(dim=1) >= 1).all()


@pytest.mark.timeout(180)
def test_evals_main_distributed_through_submitits_local_executor(tmp_path, trained_runs):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = folder_eval_config(tmp_path, ['knn'], knn={'k': 3}, logging={'folder': str(tmp_path / 'out')})
    proc = subprocess.run([sys.executable, '-m', 'evals.main_distributed', '--fname', config, '--checkpoint',
                           trained_runs['ijepa'], '--cluster', 'local', '--folder', str(tmp_path / 'submitit'),
                           '--wait'], cwd=repo, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'knn: top-1 100.00%' in proc.stdout
    with open(tmp_path / 'out' / 'evals.csv') as f:
        assert [r['checkpoint'] for r in csv.DictReader(f)] == [trained_runs['ijepa']]
    bad = write_config(tmp_path / 'bad.yaml', {'evals': ['knn'], 'knn': {'k': 'x'}})
    proc = subprocess.run([sys.executable, '-m', 'evals.main_distributed', '--fname', bad, '--cluster', 'local',
                           '--folder', str(tmp_path / 'submitit2')], cwd=repo, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and 'knn.k' in proc.stderr and not (tmp_path / 'submitit2').exists()
    # a checkpoint missing here is said before submitting (the nodes may have it; here the job then fails)
    proc = subprocess.run([sys.executable, '-m', 'evals.main_distributed', '--fname', config, '--checkpoint',
                           str(tmp_path / 'none.pth.tar'), '--cluster', 'debug', '--folder',
                           str(tmp_path / 'submitit3'), '--wait'], cwd=repo, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert 'warning' in proc.stderr and 'none.pth.tar not found on this machine' in proc.stderr, proc.stderr[-2000:]


def test_random_init_baseline_is_the_same_encoder_every_time():
    a, _ = load_encoder(None, model_name='vit_pico', patch_size=8, crop_size=32)
    torch.randn(100)                                   # whatever the global RNG state
    b, _ = load_encoder(None, model_name='vit_pico', patch_size=8, crop_size=32)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_val_labels_follow_the_train_classes_when_val_lacks_one(tmp_path):
    from evals.config import EvalDataConfig
    from evals.data import make_eval_datasets
    for split, classes in (('train', ('ant', 'bee', 'cat')), ('val', ('ant', 'cat'))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new('RGB', (8, 8)).save(tmp_path / split / c / '0.png')
    train, val = make_eval_datasets(EvalDataConfig(dataset='imagefolder', root_path=str(tmp_path)), 8,
                                    ((0.5,) * 3, (0.5,) * 3))
    assert [y for _, y in train] == [0, 1, 2] and [y for _, y in val] == [0, 2]     # 'cat' is 2 in both
    (tmp_path / 'val' / 'dog').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'val' / 'dog' / '0.png')
    with pytest.raises(ValueError, match='dog'):
        make_eval_datasets(EvalDataConfig(dataset='imagefolder', root_path=str(tmp_path)), 8, ((0.5,) * 3, (0.5,) * 3))


def test_stored_results_are_reused_only_for_the_same_config_and_checkpoint_file(tmp_path, trained_runs, monkeypatch):
    import shutil
    import time
    from evals.ab import run_results
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(trained_runs['ijepa'], run / 'jepa-latest.pth.tar')
    write_image_folder(tmp_path / 'data')
    params = {'evals': ['knn'], 'data': {'dataset': 'imagefolder', 'root_path': str(tmp_path / 'data')},
              'knn': {'k': 3}}
    config = write_config(tmp_path / 'eval.yaml', params)
    calls = []
    import evals.scaffold as scaffold
    real_run = scaffold.run
    monkeypatch.setattr(scaffold, 'run', lambda cfg, device: calls.append(1) or real_run(cfg, device))
    run_results(str(run), config)
    run_results(str(run), config)
    assert len(calls) == 1                                       # same config, same checkpoint: reused
    write_config(tmp_path / 'eval.yaml', {**params, 'knn': {'k': 1}})
    run_results(str(run), config)
    assert len(calls) == 2                                       # another k: evaluated again
    time.sleep(0.01)
    shutil.copy(trained_runs['dseq'], run / 'jepa-latest.pth.tar')   # the run trained on
    assert run_results(str(run), config)[0]['method'] == 'dseq' and len(calls) == 3


def test_cached_features_are_not_reused_after_the_data_changed(tmp_path, trained_runs):
    config = folder_eval_config(tmp_path, ['knn'], per_class=3, pretrain={'checkpoint': trained_runs['ijepa']},
                                knn={'k': 3}, logging={'folder': str(tmp_path / 'out')})
    from evals.main import main
    main(['--fname', config])
    for split in ('train', 'val'):                 # a third class appears
        (tmp_path / 'data' / split / 'grey').mkdir()
        for i in range(3):
            Image.new('RGB', (20, 20), (128, 128, 128)).save(tmp_path / 'data' / split / 'grey' / f'{i}.png')
    main(['--fname', config])
    results = json.load(open(tmp_path / 'out' / 'evals.json'))
    assert len(os.listdir(tmp_path / 'out' / 'features')) == 4      # new features for the new data
    assert results[0]['top1'] >= 0


def test_a_requested_crop_size_sets_the_resolution_not_the_weights(trained_runs):
    encoder, info = load_encoder(trained_runs['ijepa'], crop_size=48)
    assert info['crop_size'] == 48
    assert encoder(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)   # position embedding interpolated


def test_figures_follow_the_eval_configs_encoder_and_crop_size(tmp_path, trained_runs, monkeypatch):
    import src.helper
    calls = []
    real = src.helper.load_encoder
    monkeypatch.setattr(src.helper, 'load_encoder', lambda *a, **k: calls.append(k) or real(*a, **k))
    from evals.figures import make_figures
    config = folder_eval_config(tmp_path, ['knn'], pretrain={'which': 'encoder', 'crop_size': 32})
    make_figures(trained_runs['dseq'], config, str(tmp_path / 'f'), num_images=2)
    # Figure 5's features from pretrain.which; the saliency from the encoder the step used (the target encoder)
    assert [(k['which'], k['crop_size']) for k in calls] == [('encoder', 32), ('target_encoder', 32)]


@pytest.mark.parametrize('flags,message', [(['--start', '-3'], 'at least 0'), (['--num-images', '0'], 'at least 1'),
                                           (['--start', '100000'], 'the test set has')])
def test_figures_refuse_images_outside_the_test_set(tmp_path, trained_runs, flags, message, capsys):
    from evals.figures import main as figures_main
    config = folder_eval_config(tmp_path, ['knn'])
    with pytest.raises(SystemExit) as info:
        figures_main(['--checkpoint', trained_runs['dseq'], '--fname', config, '--out', str(tmp_path / 'f')] + flags)
    assert message in str(info.value) and not (tmp_path / 'f').exists()
