"""tools/deployment/pytorch2onnx.py: ONNX export of DAT backbones, segmentors (whole
inference) and detector features, checked with onnxruntime at two input sizes and batch
sizes from one file (the batch, height and width axes are dynamic), and refusals that name
what cannot be exported faithfully. DAT-T++ layouts (neighborhood + deformable attention)
and DAT-T's (shifted windows + deformable attention, in the demo configs) both export."""
import importlib.util
import os.path as osp
import re

import pytest
import torch

from conftest import DET_CFG, NANO_PP, REPO, SEG_CFG

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

_spec = importlib.util.spec_from_file_location('pytorch2onnx', osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py'))
p2o = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(p2o)

ATOL = 1e-4


def _nano_config(tmp_path, base: str, arch: dict, **model) -> str:
    """A config that inherits ``configs/<base>`` with the backbone shrunk to ``arch``."""
    path = tmp_path / f'nano_{base}'
    path.write_text(f'_base_ = [{osp.join(REPO, "configs", base)!r}]\n'
                    f'model = dict(backbone=dict(arch={dict(arch, _delete_=True)!r}, init_cfg=None), **{model!r})\n')
    return str(path)


def _verified(out: str):
    """``{(h, w): diff}`` from the tool's ``verify HxW: max abs diff D`` lines."""
    found = re.findall(r'verify \d+x3x(\d+)x(\d+): max abs diff (\S+) \((ok|FAILED)', out)
    return {(int(h), int(w)): float(d) for h, w, d, _ in found}


def test_backbone_of_a_paper_config_exports_with_dynamic_size(tmp_path, capsys):
    """DAT++ (neighborhood + deformable attention, the ++ formulas) from a paper config, at
    a nano width: one file, verified at the export size and at another."""
    out = tmp_path / 'backbone.onnx'
    cfg = _nano_config(tmp_path, 'mask_rcnn_datpp_t_1x.py', NANO_PP)
    code = p2o.main([cfg, '--part', 'backbone', '--shape', '128', '160', '--out', str(out), '--verify',
                     '--verify-shape', '192', '128'])
    printed = capsys.readouterr().out
    assert code == 0, printed
    diffs = _verified(printed)
    assert set(diffs) == {(128, 160), (192, 128)} and max(diffs.values()) <= ATOL, printed

    import onnx
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert 'GridSample' in ops and {n.domain for n in model.graph.node} <= {'', 'ai.onnx'}
    assert model.opset_import[0].version >= 16
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ['batch', '', 'height', 'width']
    assert len(model.graph.output) == 4


@pytest.mark.parametrize('segmentor', ['upernet_demo', 'fpn_datpp_t'])
def test_segmentor_whole_inference_exports(segmentor, tmp_path, capsys):
    """UperNet (the demo's nano DAT-T) and Semantic FPN (DAT-T++ at a nano width): the
    logits of whole inference at the input size, as mmseg's encode_decode gives them."""
    out = tmp_path / 'seg.onnx'
    config = SEG_CFG if segmentor == 'upernet_demo' else _nano_config(
        tmp_path, 'fpn_datpp_t_80k.py', NANO_PP, neck=dict(in_channels=list(NANO_PP['embed_dims'])))
    code = p2o.main([config, '--shape', '128', '128', '--out', str(out), '--verify', '--verify-shape', '160', '192'])
    printed = capsys.readouterr().out
    assert code == 0, printed
    diffs = _verified(printed)
    assert len(diffs) == 2 and max(diffs.values()) <= ATOL, printed

    import onnxruntime as ort
    classes = p2o.load_config(config).model.decode_head.num_classes
    got = ort.InferenceSession(str(out)).run(None, {'input': torch.randn(3, 3, 96, 224).numpy()})[0]
    assert got.shape == (3, classes, 96, 224)


def test_detector_features_export_and_two_stage_heads_are_refused(tmp_path, capsys):
    """Mask R-CNN (the demo's): backbone + FPN exports; the whole two-stage detector is
    refused with the ops that have no faithful export named."""
    out = tmp_path / 'det.onnx'
    code = p2o.main([DET_CFG, '--part', 'features', '--shape', '128', '128', '--out', str(out), '--verify'])
    printed = capsys.readouterr().out
    assert code == 0 and max(_verified(printed).values()) <= ATOL, printed

    with pytest.raises(p2o.ExportError, match='NMS.*RoIAlign'):
        p2o.main([DET_CFG, '--shape', '128', '128', '--out', str(tmp_path / 'whole.onnx')])
    assert not (tmp_path / 'whole.onnx').exists()


class _FrozenScale(torch.nn.Module):
    """Reads a size into a Python float: a tracer bakes it into the graph."""

    def forward(self, x):
        return x * (1.0 / float(x.shape[-1]))


class _CustomDomain(torch.nn.Module):
    """An op that exports only as a custom-domain node."""

    def forward(self, x):
        return _CustomOp.apply(x)


class _CustomOp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def symbolic(g, x):
        return g.op('mmcv::MMCVFancyOp', x)


def test_unfaithful_graphs_are_refused_with_the_cause(tmp_path):
    out = str(tmp_path / 'bad.onnx')
    with pytest.raises(p2o.ExportError, match=r'test_export.py:\d+.*Python float'):
        p2o.export(_FrozenScale(), torch.randn(1, 3, 32, 32), out)
    assert not osp.exists(out)
    with pytest.raises(p2o.ExportError, match='mmcv::MMCVFancyOp'):
        p2o.export(_CustomDomain(), torch.randn(1, 3, 32, 32), out)
    with pytest.raises(ValueError, match='GridSample'):
        p2o.export(_CustomDomain(), torch.randn(1, 3, 32, 32), out, opset=13)
