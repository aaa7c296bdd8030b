"""Params and FLOPs of a model from an mmdet, mmseg or mmpretrain config.

    python tools/analysis_tools/get_flops.py CONFIG --shape H W [--cfg-options ...]

Builds the model of CONFIG (no dataset, no checkpoint), feeds it one random image of
H x W (a single value: square) through its data preprocessor, and counts with MMEngine's
``FlopAnalyzer`` (one multiply-add = one FLOP, the convention of the papers' tables):

* mmdet: ``model.forward(inputs, data_samples, mode='tensor')`` as mmdet's own
  get_flops does -- backbone, neck, RPN with its proposals and the RoI heads, whatever
  the detector's ``_forward`` runs. One exception, ``--mask-rois`` (default 100): the
  mask heads of a Cascade Mask R-CNN run on the first 100 RoIs only, as mmdet 2's
  ``forward_dummy`` (by which the published Swin / DAT tables were counted) and mmdet
  3's own ``StandardRoIHead.forward`` do; mmdet 3's ``CascadeRoIHead.forward`` runs them
  on all 1000 proposals (``--mask-rois 0`` counts that, about 2.4x the FLOPs);
* mmseg: ``mode='tensor'`` with the auxiliary head removed, as mmseg's get_flops does;
* mmpretrain: ``mode='tensor'`` (backbone, neck and classifier head).

The images are padded as the config's data preprocessor pads them (mmdet: to a multiple
of 32; the input shape actually counted is printed). Prints ``Flops: <x>G`` and
``Params: <y>M`` for the whole model, the same for its backbone, and the operators that
were traced but not counted.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile
import types
from functools import partial

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.config import Config, DictAction
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Params and FLOPs of a model from its config')
    parser.add_argument('config', help='config file (mmdet, mmseg or mmpretrain)')
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='input height and width (one value: square); default: 800 1280 for '
                        'mmdet, 512 2048 for mmseg, 224 for mmpretrain')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value, as in tools/train.py')
    parser.add_argument('--mask-rois', type=int, default=100,
                        help='Cascade Mask R-CNN: count its mask heads on the first N RoIs, as mmdet 2 and '
                        'mmdet 3\'s single-stage RoI head do (0: on all proposals, as mmdet 3\'s cascade head)')
    parser.add_argument('--show-table', action='store_true', help='also print the per-module FLOPs table')
    parser.add_argument('--max-depth', type=int, default=3, help='depth of the per-module table')
    return parser.parse_args(argv)


DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048), 'mmpretrain': (224, 224)}


def input_shape(shape, scope):
    if shape is None:
        return DEFAULT_SHAPES[scope]
    if len(shape) == 1:
        return (shape[0], shape[0])
    if len(shape) == 2:
        return tuple(shape)
    raise ValueError(f'--shape takes H W or one size, got {shape}')


def data_sample(scope: str, hw):
    """An empty data sample of the library, with the metainfo its models read."""
    meta = dict(img_shape=hw, ori_shape=hw, pad_shape=hw, batch_input_shape=hw, scale_factor=(1., 1.))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return DetDataSample(metainfo=meta)
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return SegDataSample(metainfo=meta)
    from mmpretrain.structures import DataSample
    return DataSample(metainfo=meta)


def build_model(cfg: Config, scope: str) -> torch.nn.Module:
    from mmengine.registry import MODELS
    init_default_scope(scope)
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # as the Runner does (mmpretrain configs)
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(model_cfg)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # training-only; not counted (as mmseg's get_flops)
    model = revert_sync_batchnorm(model)
    return model.eval()


def limit_cascade_mask_rois(model: torch.nn.Module, mask_rois: int) -> bool:
    """Makes a Cascade Mask R-CNN's tensor forward run its mask heads on the first
    ``mask_rois`` RoIs (its boxes as mmdet 3 runs them). Returns whether it applied."""
    from mmdet.models.roi_heads import CascadeRoIHead
    from mmdet.structures.bbox import bbox2roi
    roi_head = getattr(model, 'roi_head', None)
    if mask_rois <= 0 or type(roi_head) is not CascadeRoIHead or not roi_head.with_mask:
        return False

    def forward(self, x, rpn_results_list, batch_data_samples):
        batch_img_metas = [sample.metainfo for sample in batch_data_samples]
        proposals = [results.bboxes for results in rpn_results_list]
        rois = bbox2roi(proposals)
        outs = ()
        if self.with_bbox:
            rois, cls_scores, bbox_preds = self._refine_roi(x, rois, batch_img_metas,
                                                            tuple(len(p) for p in proposals))
            outs = (cls_scores, bbox_preds)
            rois = torch.cat(rois)
        mask_rois = rois[:self.flops_mask_rois]
        return outs + tuple(self._mask_forward(stage, x, mask_rois)['mask_preds'] for stage in range(self.num_stages))

    roi_head.flops_mask_rois = mask_rois
    roi_head.forward = types.MethodType(forward, roi_head)
    return True


def count(cfg: Config, shape=None, mask_rois: int = 100):
    """Returns a dict: scope, input (C, H, W counted), flops, params, backbone_flops,
    backbone_params, unsupported (op name -> occurrences), analyzer."""
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'config default_scope must be one of {SCOPES}, got {scope!r}')
    hw = input_shape(shape, scope)
    model = build_model(cfg, scope)
    torch.manual_seed(0)
    image = (torch.rand(3, *hw) * 255).to(torch.uint8)
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image], data_samples=[data_sample(scope, hw)]), False)
    inputs = data['inputs']
    limited = scope == 'mmdet' and limit_cascade_mask_rois(model, mask_rois)
    if scope == 'mmdet':  # the RPN reads the image shapes from the data samples
        model.forward = partial(model.forward, data_samples=data['data_samples'], mode='tensor')
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        flops = analyzer.total()
        by_module = analyzer.by_module()
    params = parameter_count(model)
    return dict(
        scope=scope,
        input=tuple(inputs.shape[1:]),
        flops=flops,
        params=params[''],
        backbone_flops=by_module.get('backbone', 0),
        backbone_params=params.get('backbone', 0),
        unsupported=dict(analyzer.unsupported_ops()),
        mask_rois=mask_rois if limited else None,
        analyzer=analyzer)


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        sys.exit(f'error: no such config: {args.config}')
    try:
        import mmdat  # noqa: F401  (DAT, and `mmdat::` bases, before the config is read)
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
        import mmdat  # noqa: F401
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = tempfile.mkdtemp(prefix='get_flops_')
    try:
        result = count(cfg, args.shape, args.mask_rois)
    finally:
        if osp.isdir(cfg.work_dir) and not os.listdir(cfg.work_dir):
            os.rmdir(cfg.work_dir)

    line = '=' * 40
    c, h, w = result['input']
    print(line)
    print(f'Config: {args.config} ({result["scope"]})')
    print(f'Input shape: {c}x{h}x{w}')
    print(f'Flops: {result["flops"] / 1e9:.2f}G')
    print(f'Params: {result["params"] / 1e6:.2f}M')
    print(f'Backbone flops: {result["backbone_flops"] / 1e9:.2f}G')
    print(f'Backbone params: {result["backbone_params"] / 1e6:.2f}M')
    if result['mask_rois']:
        print(f'Cascade mask heads counted on the first {result["mask_rois"]} RoIs (--mask-rois)')
    if result['unsupported']:
        ops = ', '.join(f'{k} ({v})' for k, v in sorted(result['unsupported'].items()))
        print(f'Not counted (no FLOP rule): {ops}')
    print(line)
    if args.show_table:
        from mmengine.analysis import complexity_stats_table
        print(complexity_stats_table(result['analyzer'], max_depth=args.max_depth, show_param_shapes=False))


if __name__ == '__main__':
    main()
