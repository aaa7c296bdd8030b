"""Sampling-point visualisation (paper Figure 4), inference demo on a user's image, the benchmarks."""
import importlib.util
import os.path as osp

import mmcv
import numpy as np
import pytest
import torch

from conftest import REPO


def _load(path):
    spec = importlib.util.spec_from_file_location(osp.basename(path)[:-3], osp.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_points_lie_on_the_image_and_are_drawn(tmp_path):
    vis = _load('tools/analysis_tools/visualize_sampling_points.py')
    config = osp.join(REPO, 'configs', 'mask_rcnn_datpp_t_3x.py')
    backbone, mean, std = vis.load_backbone(config)
    image = (np.random.RandomState(0).rand(96, 160, 3) * 255).astype(np.uint8)
    points = vis.sampling_points(backbone, image, mean, std, [2, 3])
    # stage 3 of DAT-T++: 4 groups, key stride 2 on a 6x10 map -> 3x5 keys; stage 4: 8 groups, 3x5 keys
    assert [len(points[2]), len(points[3])] == [4, 8]
    for stage in (2, 3):
        for xs, ys in points[stage]:
            assert xs.shape == (15,) and np.isfinite(xs).all() and np.isfinite(ys).all()
    # unbounded DAT++ offsets are clamped to the map: keys stay within the image
    xs, ys = np.concatenate([p[0] for p in points[3]]), np.concatenate([p[1] for p in points[3]])
    assert xs.min() >= -0.5 and xs.max() <= 159.5 and ys.min() >= -0.5 and ys.max() <= 95.5

    path = str(tmp_path / 'in.jpg')
    mmcv.imwrite(image, path)
    out = str(tmp_path / 'points.png')
    vis.main([config, path, '--out', out])
    assert mmcv.imread(out).shape[2] == 3


def test_sampling_point_panels_each_have_a_legend_and_share_colours():
    vis = _load('tools/analysis_tools/visualize_sampling_points.py')
    image = np.zeros((32, 48, 3), np.uint8)
    points = {stage: [(np.array([1.0, 2.0]), np.array([3.0, 4.0]))] * groups for stage, groups in ((2, 2), (3, 4))}
    fig = vis.draw_sampling_points(image, points, [2, 3])
    for ax, stage in zip(fig.axes, [2, 3]):
        legend = ax.get_legend()
        assert legend is not None, f'stage {stage + 1} has no legend'
        assert [t.get_text() for t in legend.get_texts()] == [f'group {g}' for g in range(len(points[stage]))]
    colours = [[tuple(c.get_facecolor()[0]) for c in ax.collections] for ax in fig.axes]
    assert colours[0] == colours[1][:2] and len(set(colours[1])) == 4  # group g: one colour in every panel


def test_inference_demo_saves_the_picture(tmp_path):
    demo = _load('tools/inference_demo.py')
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    import mmdat  # noqa: F401
    config = osp.join(REPO, 'configs', 'demo', 'upernet_dat_demo.py')
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    image = str(tmp_path / 'photo.jpg')
    mmcv.imwrite((np.random.RandomState(0).rand(64, 80, 3) * 255).astype(np.uint8), image)
    demo.main([config, checkpoint, image, '--out-dir', str(tmp_path / 'out'), '--device', 'cpu'])
    drawn = mmcv.imread(str(tmp_path / 'out' / 'vis' / 'photo.jpg'))
    assert drawn is not None and drawn.shape[:2] == (64, 80)


def test_benchmark_reports_images_per_second(capsys):
    bench = _load('tools/analysis_tools/benchmark.py')
    bench.main([osp.join(REPO, 'configs', 'upernet_dat_t_160k.py'), '--shape', '64', '64', '--iters', '1',
                '--warmup', '0', '--device', 'cpu', '--train'])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith('upernet_dat_t_160k.py: ') and float(line.split()[1]) > 0


def test_backbone_benchmark_merges_rounds_and_prints_ratios(capsys):
    bench = _load('tools/analysis_tools/benchmark_backbone.py')
    common = dict(kind='block', name='datpp_t_s3', size=None, mode='fwd', amp=False, device='cpu', threads=None,
                  repeats=1, warmup=0)
    runs = {impl: [bench.run_case(dict(common, impl=impl)) for _ in range(2)] for impl in ('reference', 'fast')}
    results = [bench._merge(r) for r in runs.values()]
    for impl, merged in zip(runs, results):
        assert merged['rounds'] == 2 and len(merged['times']) == 2
        assert merged['time_min'] == min(r['time'] for r in runs[impl])
        assert merged['mem'] == max(r['mem'] for r in runs[impl])
    assert bench._merge([dict(common, error='timeout')])['error'] == 'timeout'
    bench.report(results, 'cpu')
    fast = next(line for line in capsys.readouterr().out.splitlines() if ' fast ' in line).split()
    assert fast[-3:] == ['fast', '/', 'reference']
    assert float(fast[8]) == round(results[1]['faults'] / 1000, 1) and results[1]['faults'] >= 0
    assert float(fast[9]) == round(results[1]['time'] / results[0]['time'], 2)


def test_backbone_benchmark_times_whole_detectors(capsys):
    """The detector cases run the real Mask R-CNN: inference through NMS and mask pasting,
    and a training step on random boxes with masks; the report gives images per second."""
    bench = _load('tools/analysis_tools/benchmark_backbone.py')
    args = bench.parse_args(['--cases', 'detectors', '--detectors', 'dat_t', '--detector-size', '64x96',
                             '--detector-batch', '2', '--repeats', '1', '--warmup', '0'])
    cases = bench._cases(args, 'cpu')
    assert [(c['kind'], c['mode'], c['size'], c['batch']) for c in cases] == [
        ('detector', 'fwd', (64, 96), 2), ('detector', 'fwd+bwd', (64, 96), 2)]
    results = [bench.run_case(case) for case in cases]
    for r in results:
        assert r['images_per_s'] == pytest.approx(2 / r['time']) and r['mem'] > 0
    bench.report(results, 'cpu')
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('dat_t mrcnn')]
    assert len(lines) == 2 and all(line.endswith('img/s)') for line in lines)


def test_backbone_benchmark_interleaves_three_rounds_of_backbones_by_default():
    bench = _load('tools/analysis_tools/benchmark_backbone.py')
    args = bench.parse_args(['--cases', 'blocks', 'backbones', '--sizes', '512x512'])
    cases = bench._cases(args, 'cpu')
    kinds = [case['kind'] for case in cases]
    assert bench._rounds(args, cases) == [3 if kind == 'backbone' else 1 for kind in kinds]
    assert 'block' in kinds and 'backbone' in kinds
    args = bench.parse_args(['--cases', 'blocks', 'backbones', '--rounds', '2'])
    assert set(bench._rounds(args, bench._cases(args, 'cpu'))) == {2}
