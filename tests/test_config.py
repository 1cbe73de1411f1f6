"""Typed configs: ijepa's configs load unchanged, typos and wrong types stop at start-up naming the key."""
import glob
import os

import pytest
import yaml

from src.config import ConfigError, dump_config, load_config, parse_config
from src.train import main as train_main

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IJEPA_CONFIGS = ['in1k_vith14_ep300', 'in1k_vith16-448_ep300', 'in22k_vitg16_ep44', 'in22k_vith14_ep66']
ALL_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True)
                     if os.sep + 'evals' + os.sep not in p)              # pretraining configs
EVAL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'evals', '*.yaml')))


@pytest.mark.parametrize('name', IJEPA_CONFIGS)
def test_ijepa_configs_mean_ijepa(name):
    path = os.path.join(ROOT, 'configs', f'{name}.yaml')
    with open(path) as f:
        raw = yaml.safe_load(f)
    cfg = load_config(path)
    # every key of ijepa's file is read with its value; new keys default to plain I-JEPA
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f'{section}.{key}'
    assert cfg.meta.method == 'ijepa' and cfg.meta.use_cls_token is False
    assert cfg.mask.blocks_reach_edge is False and cfg.meta.init_rescale is False


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=[os.path.relpath(p, ROOT) for p in ALL_CONFIGS])
def test_every_shipped_config_trains_two_steps_at_tiny_size(path, tmp_path):
    """Each config's own mask and optimisation settings, on a tiny model, synthetic data and a 12x12 grid."""
    with open(path) as f:
        params = yaml.safe_load(f)
    for section in ('meta', 'data', 'mask', 'optimization', 'logging'):
        params.setdefault(section, {})
    params['meta'].update(model_name='vit_pico', pred_depth=1, pred_emb_dim=16, use_bfloat16=False,
                          load_checkpoint=False)
    params['data'].update(dataset='synthetic', limit_images=8, batch_size=2, crop_size=96, num_workers=0,
                          pin_mem=False)
    params['mask']['patch_size'] = 8
    params['optimization']['max_steps'] = 2
    params['logging'].update(folder=str(tmp_path), log_freq=1)
    params.pop('evaluation', None)       # the demos' evaluation after training is tested in tests/test_evals.py
    out = train_main(params)
    assert out['step'] == 2 and out['loss'] == out['loss']   # finished, finite


@pytest.mark.parametrize('path', EVAL_CONFIGS, ids=os.path.basename)
def test_every_shipped_eval_config_parses(path):
    from evals.config import load_eval_config
    cfg = load_eval_config(path)
    assert cfg.evals and cfg.data.dataset


def marked_keys(path):
    """(section, key) of every line marked '# <- ablation' in a config file."""
    marked, section = set(), None
    for line in open(path):
        if line.strip() and not line.startswith((' ', '#')):
            section = line.split(':')[0].strip()
        elif '# <- ablation' in line:
            marked.add((section, line.split(':')[0].strip()))
    return marked


@pytest.mark.parametrize('path', sorted(glob.glob('configs/ablations/**/*.yaml', recursive=True)),
                         ids=os.path.basename)
def test_ablation_differs_from_the_vitb16_recipe_only_in_marked_keys(path):
    """Each ablation is configs/in1k_vitb16_dseq.yaml with only the keys marked '<- ablation' changed (plus its
    own log folder; an I-JEPA arm leaves out the dseq section, which I-JEPA ignores)."""
    base, ablation = (yaml.safe_load(open(f)) for f in ('configs/in1k_vitb16_dseq.yaml', path))
    changed = {(section, key) for section, values in base.items() for key in values
               if ablation.get(section, {}).get(key, values[key]) != values[key]}
    changed |= {(section, key) for section, values in ablation.items() for key in values
                if key not in base.get(section, {})}
    assert changed - {('logging', 'folder')} == marked_keys(path)
    if ablation['meta'].get('method', 'ijepa') == 'dseq':
        assert ablation['dseq'].keys() == base['dseq'].keys()


@pytest.mark.parametrize('section,key,value,expected', [
    ('mask', 'num_pred_mask', 4, 'mask.num_pred_mask'),                 # misspelled key
    ('optimization', 'learning_rate', 0.1, 'optimization.learning_rate'),
    ('data', 'batch_size', 'big', 'data.batch_size'),                   # wrong type
    ('data', 'batch_size', True, 'data.batch_size'),                    # bools are not ints
    ('meta', 'use_bfloat16', 'yes', 'meta.use_bfloat16'),
    ('mask', 'pred_mask_scale', [0.1], 'mask.pred_mask_scale'),         # wrong length
    ('meta', 'model_name', 'vit_enormous', 'meta.model_name'),          # not in the registry
    ('meta', 'method', 'mae', 'meta.method'),
])
def test_bad_key_or_type_names_the_key(section, key, value, expected):
    params = {'data': {'dataset': 'synthetic'}}
    params.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=expected.replace('.', r'\.')):
        parse_config(params)


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match='mdoel'):
        parse_config({'mdoel': {}})


def test_numbers_as_yaml_reads_them():
    # PyYAML reads 1e-6 (no dot) as a string; ijepa casts with float(), so do we. Ints are fine for floats.
    cfg = parse_config(yaml.safe_load('optimization: {final_lr: 1e-6, lr: 1}\ndata: {dataset: synthetic}'))
    assert cfg.optimization.final_lr == 1e-6 and isinstance(cfg.optimization.lr, float)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(ROOT, 'configs', 'in1k_vitl16_ijepa.yaml'))
    dump_config(cfg, tmp_path / 'c.yaml')
    assert load_config(tmp_path / 'c.yaml') == cfg


def test_missing_dataset_path_is_reported(tmp_path):
    params = {'data': {'dataset': 'imagefolder', 'root_path': str(tmp_path / 'nowhere')},
              'logging': {'folder': str(tmp_path)}}
    with pytest.raises(FileNotFoundError, match='nowhere'):
        train_main(params)


def test_predictor_width_must_split_into_the_encoder_heads():
    with pytest.raises(ConfigError, match='meta.pred_emb_dim'):
        parse_config({'meta': {'model_name': 'vit_tiny', 'pred_emb_dim': 16}, 'data': {'dataset': 'synthetic'}})
    parse_config({'meta': {'model_name': 'vit_tiny', 'pred_emb_dim': 384}, 'data': {'dataset': 'synthetic'}})
