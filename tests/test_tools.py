"""The OpenMMLab tools and the embedded demo, run for real on CPU (a few iterations each).

* tools/run_demo.py trains Mask R-CNN + DAT and UperNet + DAT, evaluates them (COCO
  mAP, mIoU), draws loss curves and predictions; tools/test.py re-evaluates a checkpoint;
* tools/dist_train.sh trains with 2 CPU processes (gloo);
* tools/train.py --resume continues an interrupted run from its last checkpoint, with the
  optimizer and scheduler states;
* checkpoints load under torch.load(weights_only=True), and a crafted pickle in a
  checkpoint is refused without running.
"""
import glob
import json
import os
import os.path as osp
import pickle
import re
import socket
import subprocess
import sys

import pytest
import torch

from conftest import DET_CFG, REPO, SEG_CFG, subprocess_env as _env

PY = sys.executable


def _run(cmd, cwd, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, text=True)
    assert proc.returncode == 0, f'{" ".join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-6000:]}'
    return proc.stdout


def _data_options(root: str, task: str):
    root = root.rstrip('/') + '/'
    opts = [f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}']
    if task == 'det':
        ann = root + 'annotations/instances_val.json'
        opts += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    return opts


def _iters_options(max_iters: int, ckpt_interval: int):
    return [f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}',
            f'default_hooks.checkpoint.interval={ckpt_interval}', 'default_hooks.logger.interval=1',
            'log_processor.window_size=1', 'train_dataloader.batch_size=2', 'val_dataloader.batch_size=4',
            'test_dataloader.batch_size=4']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from mmdat.datasets.shapes import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('data') / 'shapes')
    make_shapes_dataset(root, num_train=12, num_val=4, num_cls_train=6, num_cls_val=3)
    return root


def test_shapes_dataset_layout_and_determinism(shapes, tmp_path):
    import cv2
    import numpy as np

    from mmdat.datasets.shapes import make_shapes_dataset
    coco = json.load(open(osp.join(shapes, 'annotations', 'instances_train.json')))
    assert len(coco['images']) == 12 and [c['name'] for c in coco['categories']] == ['circle', 'square', 'triangle']
    assert coco['annotations'] and all(a['category_id'] in (1, 2, 3) for a in coco['annotations'])
    # semantic maps: ADE20K layout and encoding (0 background, k = category k), same pixels as the instances
    from pycocotools import mask as mask_util
    first = [a for a in coco['annotations'] if a['image_id'] == 1]
    seg = cv2.imread(osp.join(shapes, 'annotations', 'training', '000000.png'), cv2.IMREAD_UNCHANGED)
    assert seg.shape == (128, 128) and set(np.unique(seg)) <= {0, 1, 2, 3}
    for a in first:
        m = mask_util.decode(a['segmentation']).astype(bool)
        assert (seg[m] == a['category_id']).all() and m.sum() == a['area']
    assert len(glob.glob(osp.join(shapes, 'images', 'validation', '*.jpg'))) == 4
    assert sorted(os.listdir(osp.join(shapes, 'classification', 'train'))) == ['circle', 'square', 'triangle']
    from mmpretrain.datasets import CustomDataset  # the class-per-folder split reads as mmpretrain's CustomDataset
    cls = CustomDataset(data_root=shapes, data_prefix='classification/val', pipeline=[])
    assert cls.metainfo['classes'] == ('circle', 'square', 'triangle') and sorted(cls.get_gt_labels()) == [0, 1, 2]
    # seeded: a second copy is identical
    again = make_shapes_dataset(str(tmp_path / 'again'), num_train=12, num_val=4, num_cls_train=6, num_cls_val=3)
    for name in ('annotations/instances_train.json', 'images/training/000005.jpg', 'annotations/validation/000003.png'):
        assert open(osp.join(shapes, name), 'rb').read() == open(osp.join(again, name), 'rb').read()


@pytest.mark.slow
def test_demo_trains_evaluates_and_draws(shapes, tmp_path):
    work = tmp_path / 'demo'
    out = _run([PY, osp.join(REPO, 'tools', 'run_demo.py'), '--work-dir', str(work), '--data-root', shapes,
                '--iters', '3', '--cfg-options', 'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1',
                'log_processor.window_size=1'], cwd=tmp_path, timeout=420)
    summary = json.load(open(work / 'summary.json'))['tasks']
    det, seg = summary['mask_rcnn'], summary['upernet']
    assert det['exit_code'] == 0 and seg['exit_code'] == 0
    assert det['iterations'] == 3 and seg['iterations'] == 3
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert 0.0 <= det['metrics'][key] <= 1.0, det['metrics']
    assert 0.0 <= seg['metrics']['mIoU'] <= 100.0
    for task in ('mask_rcnn', 'upernet'):
        for picture in (f'{task}_loss.png', f'{task}_predictions.png'):
            assert (work / picture).stat().st_size > 5000, picture
    assert 'bbox mAP' in out and 'mIoU' in out

    # tools/test.py evaluates the checkpoint the demo saved (a torch.load with weights_only=True)
    ckpt = det['checkpoint']
    test_out = _run([PY, osp.join(REPO, 'tools', 'test.py'), DET_CFG, ckpt, '--work-dir', str(tmp_path / 'test'),
                     '--out', str(tmp_path / 'preds.pkl'), '--cfg-options'] + _data_options(shapes, 'det'),
                    cwd=tmp_path)
    assert 'coco/bbox_mAP' in test_out and 'Load checkpoint from' in test_out
    assert len(pickle.load(open(tmp_path / 'preds.pkl', 'rb'))) == 4


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == 'win32', reason='bash script')
@pytest.mark.slow
def test_dist_train_two_cpu_processes(shapes, tmp_path):
    work = tmp_path / 'dist'
    env_port = str(_free_port())
    cmd = ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), SEG_CFG, '2', '--work-dir', str(work),
           '--cfg-options'] + _iters_options(2, 2) + _data_options(shapes, 'seg')
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(_env(), PORT=env_port, PYTHON=PY), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    log = open(sorted(glob.glob(str(work / '*' / '*.log')))[0]).read()
    # mmengine's environment report: two processes over gloo ("GPU number" is the world size)
    assert 'Distributed training: True' in log and 'GPU number: 2' in log and "'backend': 'gloo'" in log
    assert 'Iter(train) [2/2]' in log and 'mIoU' in log
    assert (work / 'iter_2.pth').exists()


@pytest.mark.slow
def test_resume_continues_interrupted_run(shapes, tmp_path):
    work = tmp_path / 'resume'
    base = [PY, osp.join(REPO, 'tools', 'train.py'), SEG_CFG, '--work-dir', str(work)]
    data = _data_options(shapes, 'seg')
    # "interrupted" run: stopped after 4 iterations, checkpoints every 2
    _run(base + ['--cfg-options'] + _iters_options(4, 2) + data, cwd=tmp_path)
    assert (work / 'iter_4.pth').exists() and open(work / 'last_checkpoint').read().strip().endswith('iter_4.pth')
    # real mmengine checkpoints load with the safe unpickler
    first = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    assert first['meta']['iter'] == 4

    # --resume without a path: picks up the last checkpoint of the work dir
    out = _run(base + ['--resume', '--cfg-options'] + _iters_options(6, 2) + data, cwd=tmp_path)
    assert 'resumed epoch: 0, iter: 4' in out
    trained = [int(i) for i in re.findall(r'Iter\(train\) \[\s*(\d+)/6\]', out)]
    assert trained == [5, 6], trained
    final = torch.load(work / 'iter_6.pth', map_location='cpu', weights_only=True)
    assert final['meta']['iter'] == 6
    # optimizer state restored: AdamW's step count goes on from 4 (a fresh optimizer would say 2)
    steps = {float(s['step']) for s in final['optimizer']['state'].values()}
    assert steps == {6.0}, steps
    # and so does the scheduler
    assert [s['_global_step'] for s in final['param_schedulers']] == [6, 6]


class _Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f'open({self.path!r}, "w").write("pwned")',))


class _GetattrPayload:
    """Reaches past HistoryBuffer's statistics methods through the getattr that mmdat allows."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (getattr, (HistoryBuffer, '__init__'))


def test_crafted_checkpoint_does_not_execute(tmp_path):
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import CheckpointLoader

    import mmdat  # noqa: F401  installs the safe globals

    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': {'x': _Payload(str(marker))}}, evil)
    for load in (lambda p: torch.load(p, map_location='cpu'),
                 lambda p: CheckpointLoader.load_checkpoint(str(p), map_location='cpu')):
        with pytest.raises(pickle.UnpicklingError):
            load(evil)
    assert not marker.exists()

    sneaky = tmp_path / 'sneaky.pth'
    torch.save({'meta': {'x': _GetattrPayload()}}, sneaky)
    with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
        torch.load(sneaky, map_location='cpu')

    # what mmengine itself pickles still loads: a HistoryBuffer with its statistics methods
    good = tmp_path / 'good.pth'
    buf = HistoryBuffer([1.0, 2.0, 3.0], [1, 1, 1])
    torch.save({'message_hub': {'log_scalars': {'loss': buf}}}, good)
    loaded = torch.load(good, map_location='cpu')['message_hub']['log_scalars']['loss']
    assert loaded.mean() == 2.0 and loaded.statistics('max') == 3.0


def test_demo_roi_features_read_dat_maps_correctly():
    """mmcv 2.1's RoIAlign reads its input as contiguous NCHW memory and pools wrong values
    from channels-last views, which DAT's output norms used to leave. The RoI extractors
    must give what RoIAlign gives on contiguous copies of the same maps."""
    from mmdet.registry import MODELS
    from mmdet.structures.bbox import bbox2roi
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmdat  # noqa: F401
    init_default_scope('mmdet')
    cfg = Config.fromfile(DET_CFG)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(2, 3, 128, 128))
        assert all(f.is_contiguous() for f in feats)  # DAT returns NCHW memory, so the FPN does
        rois = bbox2roi([torch.tensor([[10., 12., 60., 70.], [30., 40., 90., 100.]]),
                         torch.tensor([[5., 5., 120., 110.]])])
        for extractor in (model.roi_head.bbox_roi_extractor, model.roi_head.mask_roi_extractor):
            n = extractor.num_inputs
            got = extractor(feats[:n], rois)
            want = extractor([f.contiguous() for f in feats[:n]], rois)
            assert got.abs().max() > 0 and torch.allclose(got, want, atol=1e-5)
