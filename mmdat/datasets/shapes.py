"""A small synthetic dataset of coloured shapes for the embedded demo and the tests.

Each image shows a few circles, squares and triangles of random sizes and orientations in
saturated colours over a textured, noisy, greyish background; later shapes may partly hide
earlier ones (the annotations describe what is visible). Each class has its own band of
hues (circles reddish, squares greenish, triangles bluish; +-20 degrees of hue, random
saturation and brightness): next to the shapes themselves, a cue that a small model picks
up within minutes of CPU training. Everything comes from one seed, image by image
(image ``i`` of a split draws from ``RandomState(hash(seed, split, i))``), so the same call
gives the same files on every machine.

Layout written under ``root``::

    images/training/000000.jpg ...           the images (ADE20K layout)
    images/validation/...
    annotations/training/000000.png ...      semantic maps, ADE20K encoding: 0 = background
    annotations/validation/...               (ignored with reduce_zero_label), 1..K = CLASSES
    annotations/instances_train.json         COCO instances (boxes, RLE masks, category ids
    annotations/instances_val.json           1..K), file_name relative to images/
    classification/train/<class>/000000.png  one centred shape per image (class-per-folder)
    classification/val/<class>/...
    shapes.json                              the generator's parameters (a finished-marker)
"""
import json
import os
import os.path as osp
import zlib
from typing import Dict, List, Tuple

import cv2
import numpy as np

CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle')
#: Colours of the classes for visualisation (mmdet / mmseg ``palette``).
PALETTE: List[Tuple[int, int, int]] = [(220, 20, 60), (0, 130, 230), (250, 170, 30)]
#: Centre hue of each class (OpenCV scale 0..179: red, green, blue).
HUES: Tuple[int, ...] = (0, 60, 120)
#: Version of the generator: bump when the pictures change, so old copies are rebuilt.
VERSION = 3


def _rng(seed: int, split: str, index: int) -> np.random.RandomState:
    return np.random.RandomState(zlib.crc32(f'{seed}/{split}/{index}'.encode()) & 0x7fffffff)


def _background(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    """Two greyish, slightly tinted tones blended by low-frequency noise, plus stripes and
    pixel noise: textured, but less saturated than the shapes."""
    c0, c1 = [rng.uniform(30, 225) + rng.uniform(-20, 20, 3) for _ in range(2)]
    blend = cv2.resize(rng.rand(4, 4).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    blend = np.clip(blend, 0, 1)[..., None]
    img = c0 * blend + c1 * (1 - blend)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img += rng.uniform(5, 20) * stripes[..., None]
    img += rng.normal(0, rng.uniform(4, 12), (h, w, 3))
    return img


def _shape_colour(rng: np.random.RandomState, background: np.ndarray, label: int) -> np.ndarray:
    """A saturated colour in the hue band of class ``label`` (red, green or blue, +-20
    degrees), far enough from the (greyish) background's mean colour to be seen."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(50):
        hue = (HUES[label] + rng.randint(-10, 11)) % 180  # OpenCV hues: 0..179
        hsv = np.uint8([[[hue, rng.randint(170, 256), rng.randint(150, 256)]]])
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)
        if np.abs(colour - mean).sum() > 120:
            break
    return colour


def _shape_mask(rng: np.random.RandomState, label: int, h: int, w: int, size: float) -> np.ndarray:
    """Filled mask of one shape of class ``label`` (index into CLASSES) of diameter ~``size``."""
    mask = np.zeros((h, w), np.uint8)
    r = size / 2
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    name = CLASSES[label]
    if name == 'circle':
        cv2.circle(mask, (int(round(cx * 16)), int(round(cy * 16))), int(round(r * 16)), 1, -1, cv2.LINE_AA, 4)
    else:
        n = 4 if name == 'square' else 3
        rad = r if name == 'triangle' else r * 0.9
        angles = rng.uniform(0, 2 * np.pi) + np.arange(n) * 2 * np.pi / n
        pts = np.stack([cx + rad * np.cos(angles), cy + rad * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_AA, 4)
    return mask > 0


def _scene(rng: np.random.RandomState, size: int, max_shapes: int,
           size_range: Tuple[float, float]) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """An image and its visible instances ``(label, mask)``, back to front."""
    img = _background(rng, size, size)
    instances: List[Tuple[int, np.ndarray]] = []
    for _ in range(rng.randint(1, max_shapes + 1)):
        label = rng.randint(len(CLASSES))
        for _attempt in range(10):
            mask = _shape_mask(rng, label, size, size, rng.uniform(*size_range) * size)
            # Keep every shape at least 60% visible: little overlap with the shapes before.
            if all((mask & m).sum() < 0.4 * min(mask.sum(), m.sum()) for _, m in instances):
                break
        else:
            continue
        img[mask] = _shape_colour(rng, img, label) + rng.normal(0, 6, (mask.sum(), 3))
        instances = [(lab, m & ~mask) for lab, m in instances] + [(label, mask)]
    instances = [(lab, m) for lab, m in instances if m.sum() >= 16]
    return np.clip(img, 0, 255).astype(np.uint8), instances


def _rle(mask: np.ndarray) -> Dict:
    """COCO RLE (compressed), as pycocotools writes it."""
    from pycocotools import mask as mask_util
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def _write_split(root: str, split: str, ade_split: str, num: int, size: int, seed: int,
                 max_shapes: int, size_range: Tuple[float, float]) -> None:
    img_dir = osp.join(root, 'images', ade_split)
    seg_dir = osp.join(root, 'annotations', ade_split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(seg_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        rng = _rng(seed, split, i)
        img, instances = _scene(rng, size, max_shapes, size_range)
        name = f'{i:06d}'
        cv2.imwrite(osp.join(img_dir, name + '.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        seg = np.zeros((size, size), np.uint8)
        for label, mask in instances:
            seg[mask] = label + 1
        cv2.imwrite(osp.join(seg_dir, name + '.png'), seg)
        images.append(dict(id=i + 1, file_name=f'{ade_split}/{name}.jpg', height=size, width=size))
        for label, mask in instances:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=label + 1, iscrowd=0,
                area=int(mask.sum()), segmentation=_rle(mask),
                bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=k + 1, name=n, supercategory='shape') for k, n in enumerate(CLASSES)])
    with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)


def _write_classification(root: str, split: str, num: int, size: int, seed: int) -> None:
    for i in range(num):
        rng = _rng(seed, 'cls-' + split, i)
        label = i % len(CLASSES)
        img = _background(rng, size, size)
        mask = _shape_mask(rng, label, size, size, rng.uniform(0.45, 0.85) * size)
        img[mask] = _shape_colour(rng, img, label) + rng.normal(0, 6, (mask.sum(), 3))
        out = osp.join(root, 'classification', split, CLASSES[label])
        os.makedirs(out, exist_ok=True)
        cv2.imwrite(osp.join(out, f'{i:06d}.png'), np.clip(img, 0, 255).astype(np.uint8))


def make_shapes_dataset(root: str = 'data/shapes', num_train: int = 400, num_val: int = 100,
                        img_size: int = 128, max_shapes: int = 4,
                        size_range: Tuple[float, float] = (0.2, 0.5), num_cls_train: int = 300,
                        num_cls_val: int = 90, cls_img_size: int = 48, seed: int = 0,
                        force: bool = False) -> str:
    """Writes the dataset under ``root`` (see the module's docstring) and returns ``root``.

    Returns at once when ``root`` already holds a complete copy made with the same
    parameters (``shapes.json``), unless ``force``.

    Args:
        num_train, num_val: Scenes in the detection / segmentation splits.
        img_size: Side of the square scenes in pixels.
        max_shapes: Up to this many shapes per scene (at least one).
        size_range: Shape diameters as fractions of ``img_size``.
        num_cls_train, num_cls_val: Images of the classification splits (balanced classes).
        cls_img_size: Side of the classification images.
        seed: Seed of everything.
    """
    params = dict(version=VERSION, num_train=num_train, num_val=num_val, img_size=img_size,
                  max_shapes=max_shapes, size_range=list(size_range), num_cls_train=num_cls_train,
                  num_cls_val=num_cls_val, cls_img_size=cls_img_size, seed=seed, classes=list(CLASSES))
    marker = osp.join(root, 'shapes.json')
    if not force and osp.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
    if osp.exists(marker):
        os.remove(marker)
    _write_split(root, 'train', 'training', num_train, img_size, seed, max_shapes, size_range)
    _write_split(root, 'val', 'validation', num_val, img_size, seed, max_shapes, size_range)
    _write_classification(root, 'train', num_cls_train, cls_img_size, seed)
    _write_classification(root, 'val', num_cls_val, cls_img_size, seed)
    with open(marker, 'w') as f:
        json.dump(params, f, indent=1)
    return root
