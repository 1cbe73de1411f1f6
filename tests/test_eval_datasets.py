# The torchvision-backed entries of the evaluation registry (evals/data.py) on tiny generated fixtures written in
# each dataset's real on-disk layout: split sizes, item labels, the image/label pairing, the evaluation transform
# and the error raised when the data is missing. Every image is a plain colour whose red channel encodes its
# label (RED[label]), so an image paired with the wrong label is caught as well as a wrong label.

import json
import re
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from evals.config import EvalDataConfig
from evals.data import DATASETS, make_eval_datasets

pytestmark = [pytest.mark.timeout(120)]

RED = {label: 20 + 40 * label for label in range(6)}      # label -> red channel of its images (<= 220)
NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def image(path, label, mode='RGB'):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (RED[label], 90, 160) + ((255,) if mode == 'RGBA' else ())
    Image.new(mode, (12, 10), colour).save(path)


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(line + '\n' for line in lines))


# Each writer creates the dataset under `root` and returns the expected labels of (train split, test split), in the
# order the dataset lists its items.

def write_stanford_cars(root):
    base = root / 'stanford_cars'
    (base / 'devkit').mkdir(parents=True)
    scipy.io.savemat(base / 'devkit' / 'cars_meta.mat', {'class_names': np.array(
        ['AM General Hummer SUV 2000', 'Acura RL Sedan 2012', 'Audi TTS Coupe 2012'], dtype=object)})
    splits = {'train': ('devkit/cars_train_annos.mat', 'cars_train', [3, 1, 2, 1]),      # 1-based classes
              'test': ('cars_test_annos_withlabels.mat', 'cars_test', [2, 3, 1])}
    for mat, folder, classes in splits.values():
        records = []
        for i, c in enumerate(classes):
            fname = f'{i + 1:05d}.jpg'
            image(base / folder / fname, c - 1)
            records.append((1, 1, 11, 9, c, fname))           # bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
        dtype = [(k, object) for k in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname')]
        scipy.io.savemat(base / mat, {'annotations': np.array(records, dtype=dtype)})
    return [2, 0, 1, 0], [1, 2, 0]


INAT_CLASSES = ['00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax',
                '00001_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major',
                '00002_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina']


def write_inaturalist(root):
    # one folder per species, named id_kingdom_phylum_class_order_family_genus_species; files in a folder are
    # listed in os.listdir order, so the expected labels are blocks of equal labels in folder order
    counts = {'2021_train': [2, 1, 3], '2021_valid': [1, 2, 1]}
    for version, per_class in counts.items():
        for label, (folder, n) in enumerate(zip(INAT_CLASSES, per_class)):
            for i in range(n):
                image(root / version / folder / f'{label}f3c1a2-{i:04d}.jpg', label)
    return [0, 0, 1, 2, 2, 2], [0, 1, 1, 2]


def write_fgvc_aircraft(root):
    data = root / 'fgvc-aircraft-2013b' / 'data'
    variants = ['707-320', 'A300B4', 'Cessna 172']                  # names may contain spaces
    write_lines(data / 'variants.txt', variants)
    splits = {'trainval': [('1025794', 2), ('1340192', 0), ('0056978', 1), ('0434473', 2)],
              'test': [('1514522', 1), ('0062765', 2), ('2220853', 0)]}
    for split, items in splits.items():
        write_lines(data / f'images_variant_{split}.txt', [f'{name} {variants[c]}' for name, c in items])
        for name, c in items:
            image(data / 'images' / f'{name}.jpg', c)
    return [c for _, c in splits['trainval']], [c for _, c in splits['test']]


def write_oxford_pets(root):
    base = root / 'oxford-iiit-pet'
    breeds = {'Abyssinian': (1, 1), 'american_bulldog': (2, 2), 'Bengal': (3, 1)}   # class id, species (1 cat)
    splits = {'trainval': ['Bengal_1', 'Abyssinian_1', 'american_bulldog_1', 'Bengal_2'],
              'test': ['american_bulldog_2', 'Abyssinian_2', 'Bengal_3']}
    labels = {}
    for split, ids in splits.items():
        lines = []
        for image_id in ids:
            class_id, species = breeds[image_id.rsplit('_', 1)[0]]
            lines.append(f'{image_id} {class_id} {species} {class_id}')
            image(base / 'images' / f'{image_id}.jpg', class_id - 1)
        write_lines(base / 'annotations' / f'{split}.txt', lines)
        labels[split] = [int(line.split()[1]) - 1 for line in lines]
    (base / 'annotations' / 'trimaps').mkdir()
    return labels['trainval'], labels['test']


def write_clevr(root):
    # the label is the number of objects of the scene; images are RGBA PNGs as in CLEVR, listed in name order
    data = root / 'clevr' / 'CLEVR_v1.0'
    counts = {'train': [3, 5, 4, 3], 'val': [4, 3, 5]}
    for split, per_image in counts.items():
        scenes = []
        for i, n in reversed(list(enumerate(per_image))):     # scenes need not be in file order
            name = f'CLEVR_{split}_{i:06d}.png'
            image(data / 'images' / split / name, n, mode='RGBA')
            scenes.append({'image_index': i, 'image_filename': name, 'split': split,
                           'objects': [{'shape': 'cube', 'color': 'red'}] * n})
        (data / 'scenes').mkdir(exist_ok=True)
        (data / 'scenes' / f'CLEVR_{split}_scenes.json').write_text(json.dumps({'info': {}, 'scenes': scenes}))
    return counts['train'], counts['val']


def write_flowers102(root):
    """jpg/image_NNNNN.jpg, imagelabels.mat (1-based label of every image id), setid.mat (ids of each split)."""
    base = root / 'flowers-102'
    labels = [2, 1, 3, 1, 2, 3]                                     # image ids 1..6
    for image_id, label in enumerate(labels, start=1):
        image(base / 'jpg' / f'image_{image_id:05d}.jpg', label - 1)
    scipy.io.savemat(base / 'imagelabels.mat', {'labels': np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(base / 'setid.mat', {'trnid': np.array([[4, 1, 2]]), 'valid': np.array([[3]]),
                                          'tstid': np.array([[6, 5]])})
    return [0, 1, 0], [2, 1]


WRITERS = {'stanford_cars': write_stanford_cars, 'flowers102': write_flowers102, 'inaturalist2021': write_inaturalist,
           'fgvc_aircraft': write_fgvc_aircraft, 'oxford_pets': write_oxford_pets, 'clevr_count': write_clevr}
TORCHVISION_CLASSES = {'stanford_cars': 'StanfordCars', 'inaturalist2021': 'INaturalist',
                       'flowers102': 'Flowers102', 'fgvc_aircraft': 'FGVCAircraft',
                       'oxford_pets': 'OxfordIIITPet', 'clevr_count': 'CLEVRClassification'}


def config(name, root, **kwargs):
    return EvalDataConfig(dataset=name, root_path=str(root), **kwargs)


@pytest.mark.parametrize('name', list(WRITERS))
def test_builder_reads_the_split_sizes_and_labels_of_the_generated_fixture(tmp_path, name):
    expected = WRITERS[name](tmp_path)
    for train, labels in zip((True, False), expected):
        dataset = DATASETS[name](config(name, tmp_path), train, None)
        assert len(dataset) == len(labels), (name, train)
        items = [dataset[i] for i in range(len(dataset))]
        assert [int(y) for _, y in items] == labels, (name, train)
        for img, y in items:                                   # each image is the one written for its label
            assert img.size == (12, 10)
            assert abs(img.convert('RGB').getpixel((5, 5))[0] - RED[int(y)]) <= 6, (name, train)


@pytest.mark.parametrize('name', list(WRITERS))
def test_make_eval_datasets_gives_normalised_square_tensors_in_both_splits(tmp_path, name):
    expected = WRITERS[name](tmp_path)
    train, test = make_eval_datasets(config(name, tmp_path), 16, NORM)
    for dataset, labels in zip((train, test), expected):
        assert len(dataset) == len(labels)
        x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))   # labels collate for feature extraction
        assert x.shape == (len(labels), 3, 16, 16) and x.dtype == torch.float32
        assert y.tolist() == labels
        red = torch.tensor([(RED[c] / 255 - 0.5) / 0.5 for c in labels])  # plain colour survives resize and crop
        assert torch.allclose(x[:, 0], red[:, None, None].expand(-1, 16, 16), atol=0.05)
        assert torch.allclose(x[:, 2], torch.full_like(x[:, 2], (160 / 255 - 0.5) / 0.5), atol=0.05)


def test_make_eval_datasets_limits_each_split_to_evenly_spaced_items(tmp_path):
    expected = write_fgvc_aircraft(tmp_path)
    train, test = make_eval_datasets(config('fgvc_aircraft', tmp_path, limit_train=2, limit_test=5), 8, NORM)
    n = len(expected[0])
    assert [y for _, y in train] == [expected[0][0], expected[0][n // 2]]     # items 0 and n // 2
    assert [y for _, y in test] == expected[1]               # a limit above the split size keeps everything
    assert train[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize('name', list(TORCHVISION_CLASSES))
def test_a_missing_root_is_a_file_not_found_error_naming_the_dataset(tmp_path, name):
    root = tmp_path / 'nowhere'
    for train in (True, False):
        with pytest.raises(FileNotFoundError, match=re.escape(TORCHVISION_CLASSES[name])) as info:
            DATASETS[name](config(name, root), train, None)
        assert str(root) in str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(TORCHVISION_CLASSES[name])):
        make_eval_datasets(config(name, root), 16, NORM)


def test_a_split_missing_from_an_otherwise_present_dataset_is_named(tmp_path):
    write_inaturalist(tmp_path)
    shutil.rmtree(tmp_path / '2021_valid')
    DATASETS['inaturalist2021'](config('inaturalist2021', tmp_path), True, None)      # train is still there
    with pytest.raises(FileNotFoundError, match=r'INaturalist \(2021_valid\)'):
        make_eval_datasets(config('inaturalist2021', tmp_path), 16, NORM)


def test_an_unknown_dataset_name_lists_the_registry(tmp_path):
    with pytest.raises(ValueError, match='flowers102'):
        make_eval_datasets(config('flowers_102', tmp_path), 16, NORM)
