"""Reliability: bad inputs, interruption, mixed precision, untrusted checkpoints.

Where a case is covered elsewhere it is not repeated here:

* wrong number of channels -> tests/test_backbone.py::test_wrong_input_channels_is_a_clear_error
* 16x16 input (smaller than the total stride) -> test_backbone.py::test_output_shapes_any_size
* wrong-architecture checkpoint (names mis-shaped / missing keys and shapes), missing path ->
  test_backbone.py::test_mismatched_checkpoint_names_keys
* unknown preset, inconsistent heads / groups / dims -> test_backbone.py::test_bad_arch_fails_at_construction
* crafted pickle in an MMEngine checkpoint (torch.load, CheckpointLoader), resume restoring optimizer
  and scheduler -> tests/test_tools.py::test_crafted_checkpoint_does_not_execute,
  test_resume_continues_interrupted_run

The soak test (flat memory over several hundred iterations) is tools/analysis_tools/soak_test.py.
"""
import copy
import json
import os
import os.path as osp
import pickle
import re
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import mmdat  # noqa: F401
from mmdat.models.backbones.dat import DAT

from conftest import DET_CFG, NANO_PP, REPO, SEG_CFG, subprocess_env as _env

PY = sys.executable


# ----------------------------------------------------------------------------- bad input

def test_extreme_aspect_ratio():
    model = DAT(NANO_PP).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 2048))
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 512), (4, 256), (2, 128), (1, 64)]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_input_is_a_clear_error(bad):
    model = DAT(NANO_PP).eval()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=r'DAT input of shape \(2, 3, 32, 32\) holds [01] NaN and [01] Inf'):
        model(x)
    model.check_finite = False  # the check can be switched off (and on, on GPU)
    with torch.no_grad():
        model(x)


def _write_coco(root, files):
    """A COCO-format set: ``files`` maps file name -> bytes; each image but ``empty*`` has one box."""
    os.makedirs(osp.join(root, 'images'), exist_ok=True)
    images, anns = [], []
    for i, (name, data) in enumerate(files.items()):
        with open(osp.join(root, 'images', name), 'wb') as f:
            f.write(data)
        images.append(dict(id=i + 1, file_name=name, height=64, width=64))
        if not name.startswith('empty'):
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, bbox=[8, 8, 20, 20], area=400,
                             iscrowd=0, segmentation=[[8, 8, 28, 8, 28, 28, 8, 28]]))
    with open(osp.join(root, 'ann.json'), 'w') as f:
        json.dump(dict(images=images, annotations=anns, categories=[dict(id=1, name='square')]), f)


def _coco_dataset(root, test_mode=False, on_error='skip'):
    from mmdet.datasets import CocoDataset
    pipeline = [dict(type='LoadImageFromFileOrSkip', on_error=on_error),
                dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                dict(type='PackDetInputs')]
    return CocoDataset(data_root=root, ann_file='ann.json', data_prefix=dict(img='images/'),
                       metainfo=dict(classes=('square',)), filter_cfg=dict(filter_empty_gt=False),
                       pipeline=pipeline, test_mode=test_mode)


@pytest.fixture(scope='module')
def bad_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('badcoco'))
    img = np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)
    jpg = cv2.imencode('.jpg', img)[1].tobytes()
    png = cv2.imencode('.png', img)[1].tobytes()
    _write_coco(root, {'good.jpg': jpg, 'corrupt.jpg': b'this is not an image' * 10,
                       'truncated.jpg': jpg[:len(jpg) // 2], 'truncated.png': png[:len(png) // 2],
                       'empty.png': png})
    return root


def test_corrupt_and_truncated_images_are_named_and_skipped(bad_coco):
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    ds = _coco_dataset(bad_coco)
    loader = ds.pipeline.transforms[0]
    names = [osp.basename(d['img_path']) for d in ds.load_data_list()]
    seen = [osp.basename(ds[i]['data_samples'].img_path) for i in range(len(ds))]
    # training: each bad file is reported by name and another (good) sample takes its place
    assert set(seen) <= {'good.jpg', 'empty.png'}
    skipped = {osp.basename(f): reason for f, reason in loader.skipped}
    assert set(skipped) == {'corrupt.jpg', 'truncated.jpg', 'truncated.png'}, skipped
    assert 'could not be decoded' in skipped['corrupt.jpg']
    assert 'truncated JPEG' in skipped['truncated.jpg'] and 'truncated PNG' in skipped['truncated.png']
    assert names == ['good.jpg', 'corrupt.jpg', 'truncated.jpg', 'truncated.png', 'empty.png']

    # on_error='raise': the run stops with the file's name
    strict = _coco_dataset(bad_coco, on_error='raise')
    with pytest.raises(OSError, match=r'corrupt or truncated image: .*truncated\.jpg \(truncated JPEG'):
        strict[2]
    # test mode: MMEngine refuses a skipped sample, so evaluation stops (the warning names the file)
    test_ds = _coco_dataset(bad_coco, test_mode=True)
    with pytest.raises(Exception, match='should not get `None`'):
        test_ds[1]
    assert osp.basename(test_ds.pipeline.transforms[0].skipped[0][0]) == 'corrupt.jpg'


def _nano_detector():
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(DET_CFG)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def _sum_losses(losses):
    return sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if 'loss' in k)


def test_image_without_annotations_trains(bad_coco):
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):  # mmdet's LoadAnnotations, not mmseg's
        from mmengine.dataset import pseudo_collate
        ds = _coco_dataset(bad_coco)
        empty = ds[4]
        assert osp.basename(empty['data_samples'].img_path) == 'empty.png'
        assert len(empty['data_samples'].gt_instances) == 0
        model = _nano_detector().train()
        data = model.data_preprocessor(pseudo_collate([empty, ds[0]]), True)
        losses = model(**data, mode='loss')
        total = _sum_losses(losses)
        assert torch.isfinite(total)
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        # a batch of only unannotated images too
        data = model.data_preprocessor(pseudo_collate([empty, empty]), True)
        assert torch.isfinite(_sum_losses(model(**data, mode='loss')))


# ----------------------------------------------------------------------------- checkpoints

class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f'open({self.path!r}, "w").write("pwned")',))


def test_crafted_pickle_in_backbone_weights_does_not_run(tmp_path):
    from mmdat.models.backbones.dat_checkpoint import load_dat_checkpoint
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': DAT(NANO_PP).state_dict(), 'extra': _Payload(str(marker))}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_dat_checkpoint(DAT(NANO_PP), str(evil))
    assert not marker.exists()


def test_failed_checkpoint_write_keeps_previous(tmp_path):
    from mmengine.fileio import get_file_backend

    from mmdat.engine import AtomicLocalBackend, atomic_save_checkpoint
    assert isinstance(get_file_backend(str(tmp_path)), AtomicLocalBackend)  # installed by `import mmdat`
    path = str(tmp_path / 'iter_2.pth')
    atomic_save_checkpoint({'meta': {'iter': 2}, 'state_dict': {'w': torch.ones(3)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        atomic_save_checkpoint({'meta': {'iter': 4}, 'state_dict': {'w': torch.zeros(3)}, 'x': Boom()}, path)
    assert torch.load(path, weights_only=True)['meta']['iter'] == 2
    assert os.listdir(tmp_path) == ['iter_2.pth']  # no temporary left behind


def test_checkpoint_killed_while_written_keeps_previous(tmp_path):
    """SIGKILL after the new checkpoint's bytes are written, before the rename."""
    path = str(tmp_path / 'latest.pth')
    script = f'''
import os, signal, torch, mmdat
from mmengine.runner import runner
runner.save_checkpoint({{"meta": {{"iter": 2}}, "w": torch.ones(1000)}}, {path!r})
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)   # die in the middle of the next save
runner.save_checkpoint({{"meta": {{"iter": 4}}, "w": torch.zeros(1000)}}, {path!r})
'''
    proc = subprocess.run([PY, '-c', script], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(path, weights_only=True)['meta']['iter'] == 2
    leftovers = [f for f in os.listdir(tmp_path) if f != 'latest.pth']
    assert len(leftovers) == 1 and leftovers[0].startswith('.latest.pth.tmp-')  # never a *.pth


# ----------------------------------------------------------------------------- interruption

def _train_cmd(work, max_iters, extra=()):
    opts = [f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters + 100}',
            'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
            'log_processor.window_size=1', 'train_dataloader.batch_size=2', 'randomness.deterministic=True']
    return [PY, osp.join(REPO, 'tools', 'train.py'), SEG_CFG, '--work-dir', str(work), *extra, '--cfg-options',
            *opts, *_data_opts()]


_SHAPES = {}


def _data_opts():
    root = _SHAPES['root'].rstrip('/') + '/'
    return [f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}']


def _losses(text, total):
    pattern = rf'Iter\(train\) \[\s*(\d+)/{total}\](.*lr: .*loss: [\d.]+.*)'
    return {int(i): line for i, line in re.findall(pattern, text)}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    from mmdat.datasets.shapes import make_shapes_dataset
    _SHAPES['root'] = str(tmp_path / 'shapes')
    make_shapes_dataset(_SHAPES['root'], num_train=8, num_val=2, num_cls_train=3, num_cls_val=3)
    total = 8
    # the uninterrupted reference run goes on beside the killed and the resumed runs (one
    # thread each; nothing is shared but the dataset, which they only read)
    ref_log = open(tmp_path / 'ref.log', 'w+')
    ref = subprocess.Popen(_train_cmd(tmp_path / 'ref', total), cwd=tmp_path, env=_env(), stdout=ref_log,
                           stderr=subprocess.STDOUT, text=True)
    try:
        # the same run, killed with SIGKILL while training iteration 6 (after iter_4.pth was saved)
        work = tmp_path / 'killed'
        proc = subprocess.Popen(_train_cmd(work, total), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen = ''
        try:
            for line in proc.stdout:
                seen += line
                if re.search(rf'Iter\(train\) \[\s*5/{total}\]', line):
                    proc.send_signal(signal.SIGKILL)
                    break
        finally:
            proc.kill()
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, seen[-4000:]
        assert not re.search(rf'Iter\(train\) \[\s*{total}/{total}\]', seen)
        assert open(work / 'last_checkpoint').read().strip().endswith('iter_4.pth')

        resumed = subprocess.run(_train_cmd(work, total, ['--resume']), cwd=tmp_path, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-4000:]
        ref.wait(timeout=300)
    finally:
        ref.kill()
        ref.wait(timeout=60)
        ref_log.seek(0)
        ref_out = ref_log.read()
        ref_log.close()
    assert ref.returncode == 0, ref_out[-4000:]
    ref_losses = _losses(ref_out, total)
    assert sorted(ref_losses) == list(range(1, total + 1))

    assert 'resumed epoch: 0, iter: 4' in resumed.stdout
    after = _losses(resumed.stdout, total)
    assert sorted(after) == list(range(5, total + 1))
    for i in after:  # loss values and learning rate of every iteration after the resume, as printed
        strip = lambda s: re.sub(r'\s*(time|data_time|memory|eta): [\d.:]+\s*', ' ', s)  # noqa: E731
        assert strip(after[i]) == strip(ref_losses[i]), (i, after[i], ref_losses[i])
    final = torch.load(work / f'iter_{total}.pth', weights_only=True)
    assert {float(s['step']) for s in final['optimizer']['state'].values()} == {float(total)}
    assert final['param_schedulers'][0]['last_step'] == total  # (the second scheduler starts at 50)


# ----------------------------------------------------------------------------- mixed precision

def _train_steps(model, data, steps, bf16):
    """``steps`` AdamW steps on one batch; backbone + neck under CPU bf16 autocast when ``bf16``.

    The heads stay in float32: mmcv's CPU kernels (nms, RoIAlign) have no bfloat16 version.
    """
    from mmdat.models.layers import deformable_attention as da
    record = []
    original = da.DeformableAttention.sampling_positions

    def spy(self, offset):
        pos = original(self, offset)
        Hk, Wk = offset.shape[-2:]
        s = self.offset_range_factor
        if s > 0 or (s == 0 and self.flavor == 'pp'):  # reference grid + s key-grid cells
            grid = da._grid(Hk, Wk, True, self.flavor, pos.device, torch.float32)
            cell = 1.0 / min(Hk, Wk) if self.flavor == 'v1' else 1.0 / max(min(Hk, Wk) - 1, 1)
            bound = float(grid.abs().max()) + s * cell
        else:  # tanh / clamp
            bound = 1.0
        record.append((pos.dtype, float(pos.detach().abs().max()), bound))
        return pos

    extract = model.extract_feat

    def extract_amp(x):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            feats = extract(x)
        return tuple(f.float() for f in feats)

    model.extract_feat = extract_amp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    da.DeformableAttention.sampling_positions = spy
    try:
        for _ in range(steps):
            total = _sum_losses(model(**data, mode='loss'))
            assert torch.isfinite(total), total
            opt.zero_grad()
            total.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            losses.append(float(total.detach()))
    finally:
        da.DeformableAttention.sampling_positions = original
    return losses, record


def test_bf16_autocast_training_is_finite_and_close_to_fp32():
    from mmdet.testing import demo_mm_inputs
    model32 = _nano_detector().train()
    model16 = copy.deepcopy(model32)
    torch.manual_seed(1)
    packed = demo_mm_inputs(2, [[3, 64, 64], [3, 64, 64]], num_items=[3, 2], num_classes=3, with_mask=True)
    data = model32.data_preprocessor(packed, True)
    steps = 2
    torch.manual_seed(2)
    l32, rec32 = _train_steps(model32, data, steps, bf16=False)
    torch.manual_seed(2)
    l16, rec16 = _train_steps(model16, data, steps, bf16=True)
    assert rec16, 'the detector has deformable attention blocks'
    for dtype, amax, bound in rec16:  # sampling positions stay float32 and inside their bounds
        assert dtype == torch.float32
        assert amax <= bound + 1e-5, (amax, bound)
    assert l16[-1] < l16[0]  # it learns
    for a, b in zip(l32, l16):
        assert abs(a - b) <= 0.1 * abs(a) + 0.05, (l32, l16)


def test_cpu_bf16_optim_wrapper_trains_backbone_and_neck_in_bf16():
    """``tools/train.py --amp`` on CPU: bf16 autocast of the backbone and neck, float32 heads
    (mmcv's CPU nms / RoIAlign), finite losses, the modules' own forward back afterwards."""
    from mmdet.testing import demo_mm_inputs

    from mmdat.engine import CPUBF16OptimWrapper
    model = _nano_detector().train()
    wrapper = CPUBF16OptimWrapper(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    dtypes = {}
    stem_conv = next(m for m in model.backbone.stem.modules() if isinstance(m, torch.nn.Conv2d))
    stem_conv.register_forward_hook(lambda m, a, out: dtypes.update(stem=out.dtype) or None)
    model.rpn_head.register_forward_pre_hook(lambda m, args: dtypes.update(rpn_in=args[0][0].dtype) or None)
    torch.manual_seed(1)
    packed = demo_mm_inputs(2, [[3, 64, 64], [3, 64, 64]], num_items=[3, 2], num_classes=3, with_mask=True)
    before = stem_conv.weight.detach().clone()
    for _ in range(2):
        log_vars = model.train_step(packed, wrapper)
        assert all(torch.isfinite(torch.as_tensor(v)) for v in log_vars.values()), log_vars
    assert dtypes == dict(stem=torch.bfloat16, rpn_in=torch.float32)
    assert not torch.equal(before, stem_conv.weight)
    assert 'forward' not in vars(model.backbone) and 'forward' not in vars(model.neck)
    with pytest.raises(ValueError, match='none of the submodules'):
        with CPUBF16OptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 autocast_modules=('encoder', )).optim_context(model):
            pass


def test_train_amp_on_cpu_selects_the_bf16_wrapper():
    import importlib.util
    spec = importlib.util.spec_from_file_location('mmdat_train_tool', osp.join(REPO, 'tools', 'train.py'))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    if train._has_accelerator():
        pytest.skip('an accelerator is present: --amp picks AmpOptimWrapper')
    cfg = train.build_config(train.parse_args([DET_CFG, '--amp', '--work-dir', 'unused']))
    assert cfg.optim_wrapper.type == 'CPUBF16OptimWrapper' and 'loss_scale' not in cfg.optim_wrapper
