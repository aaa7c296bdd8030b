"""Exports a model of an mmdat config to ONNX, and checks it with onnxruntime.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] --shape H W --out FILE
        [--part backbone|features|model] [--verify] [--verify-shape H W ...]

What is exported (``--part``; the graph's input is the image after the data preprocessor:
``B x 3 x H x W``, RGB, mean / std normalised; batch, height and width are dynamic axes):

* ``backbone``: the backbone's feature maps, for any config (classification, detection,
  segmentation);
* ``features``: backbone and neck (a detector's ``extract_feat``: FPN levels);
* ``model`` (default): a segmentor's whole inference (``EncoderDecoder.encode_decode``: the
  logits resized to the input, ``B x classes x H x W``), a single-stage detector's raw head
  outputs (scores and box deltas per level, before decoding and NMS), a classifier's logits.
  Two-stage detectors stop at proposals (NMS, RoIAlign): export their ``features`` instead.

Every attention module runs its reference formulation (PyTorch ops: grid_sample, einsum,
softmax) while exporting; the ONNX graph holds standard ops only (opset >= 16 for
GridSample). ``--verify`` runs the file with onnxruntime on the export size and on each
``--verify-shape`` (default: one other size; a batch of 2) and prints the largest absolute
difference to the PyTorch model (with its default, fast ops); it fails above ``--atol``.
Modules whose trace would freeze the input size (UperNet's adaptive pooling, Semantic FPN's
upsampling) are swapped for equivalents while exporting.

Refused with an error that names the cause, never written as a silently wrong graph:
operators without a standard ONNX counterpart (named, with their domain), and values the
TorchScript tracer would freeze from the export input (named by file and line). See
docs/export.md.
"""
import argparse
import contextlib
import os
import os.path as osp
import re
import sys
import tempfile
import time
import warnings
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

PARTS = ('backbone', 'features', 'model')
#: ONNX domains onnxruntime runs without a custom-op library.
STANDARD_DOMAINS = ('', 'ai.onnx')
#: Tracer warnings about a value read from a tensor into Python: the graph would keep the
#: export input's value as a constant. (Python booleans only pick a branch; the branches
#: DAT takes depend on sizes that every input above the minimum size shares. A Python
#: number made a tensor is a constant by itself: it warns only if it came from a tensor.)
FROZEN_VALUE = re.compile(r'Python (float|integer|int|number|index)')


class ExportError(RuntimeError):
    """The model cannot be exported faithfully; the message says which op or line."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export an mmdat model to ONNX (and check it with onnxruntime)')
    parser.add_argument('config', help='mmdet, mmseg or mmpretrain config')
    parser.add_argument('checkpoint', nargs='?', default=None, help='checkpoint to load (default: random weights)')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='input size of the export (the graph accepts other sizes)')
    parser.add_argument('--out', required=True, help='ONNX file to write')
    parser.add_argument('--part', choices=PARTS, default='model', help='what to export (see the docstring)')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset (>= 16: GridSample)')
    parser.add_argument('--dynamo', action='store_true',
                        help='export with torch.export (torch.onnx.export(dynamo=True)) instead of the '
                        'TorchScript tracer; see docs/export.md for what it does not yet handle')
    parser.add_argument('--verify', action='store_true', help='compare onnxruntime with PyTorch')
    parser.add_argument('--verify-shape', type=int, nargs=2, action='append', metavar=('H', 'W'),
                        help='other input size to verify at (repeatable; default: H+64 W+32)')
    parser.add_argument('--atol', type=float, default=1e-4, help='largest absolute difference --verify accepts')
    parser.add_argument('--cfg-options', nargs='+', default=None,
                        help='override settings of the config, key=value, as in tools/train.py')
    return parser.parse_args(argv)


@contextlib.contextmanager
def reference_formulation(model: nn.Module) -> Iterator[None]:
    """Within the block, every attention module of ``model`` (and every mmdat op) runs its
    reference formulation: plain PyTorch ops that export, instead of the CPU / CUDA kernels,
    which do not. The one place the export chooses the implementation."""
    changed = [(m, m.attn_impl) for m in model.modules() if getattr(m, 'attn_impl', None) not in (None, 'reference')]
    for m, _ in changed:
        m.attn_impl = 'reference'
    from mmdat.ops import attention_impl  # every kind, the depth-wise conv kernels too
    try:
        with attention_impl('reference'):
            yield
    finally:
        for m, impl in changed:
            m.attn_impl = impl


class AdaptiveAvgPool2dByCumsum(nn.Module):
    """``nn.AdaptiveAvgPool2d`` in ops that export with dynamic input sizes (ONNX has no
    adaptive pooling but the global one): the mean over PyTorch's windows
    ``[floor(i n / k), ceil((i + 1) n / k))`` of each axis in turn, as differences of
    cumulative sums."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dim, k in zip((2, 3), self.output_size):
            if k is not None:
                x = self._mean_over_windows(x, dim, k)
        return x

    @staticmethod
    def _mean_over_windows(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
        n = x.shape[dim]
        i = torch.arange(k, device=x.device)
        start, end = (i * n) // k, ((i + 1) * n + k - 1) // k
        sums = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)
        window = sums.index_select(dim, end) - sums.index_select(dim, start)
        shape = [1] * x.dim()
        shape[dim] = k
        return window / (end - start).to(x.dtype).view(shape)


class UpsampleByScale(nn.Module):
    """mmseg's ``Upsample`` by a scale factor, without its Python ``int`` of the output
    size (a tracer would freeze it): the same sizes (``floor(n * scale)``) and coordinates."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = upsample.scale_factor, upsample.mode, upsample.align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                                               align_corners=self.align_corners, recompute_scale_factor=True)


def _exportable_replacement(module: nn.Module):
    """An equivalent module for ``module`` whose graph keeps sizes dynamic, or ``None``."""
    if type(module) is nn.AdaptiveAvgPool2d and module.output_size not in (1, (1, 1)):
        return AdaptiveAvgPool2dByCumsum(module.output_size)  # UperNet's pyramid pooling
    if type(module).__name__ == 'Upsample' and type(module).__module__.startswith('mmseg') and not module.size:
        return UpsampleByScale(module)  # Semantic FPN's head
    return None


@contextlib.contextmanager
def exportable_modules(model: nn.Module) -> Iterator[None]:
    """Within the block, the submodules of ``model`` whose export would freeze the input
    size (see :func:`_exportable_replacement`) are replaced by equivalents."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _exportable_replacement(child)
            if replacement is not None:
                swapped.append((parent, name, child))
                setattr(parent, name, replacement)
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def load_config(path: str, cfg_options: Sequence[str] = None):
    from mmengine.config import Config, DictAction
    if not osp.isfile(path):
        raise FileNotFoundError(f'no such config: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        parser = argparse.ArgumentParser()
        parser.add_argument('--o', nargs='+', action=DictAction)
        cfg.merge_from_dict(parser.parse_args(['--o', *cfg_options]).o)
    return cfg


def build_model(cfg, checkpoint: str = None) -> nn.Module:
    """The config's model in eval mode (random weights, no pretrained download), with the
    checkpoint's weights when given."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = revert_sync_batchnorm(MODELS.build(model_cfg))
    if checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu')
    if hasattr(model.backbone, 'check_finite'):
        model.backbone.check_finite = False  # a data-dependent check: not part of a graph
    return model.eval()


def _flatten(outs) -> Tuple[torch.Tensor, ...]:
    if isinstance(outs, torch.Tensor):
        return (outs, )
    return tuple(t for o in outs for t in _flatten(o))


class Backbone(nn.Module):
    """The backbone's feature maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, x):
        return _flatten(self.backbone(x))


class Features(nn.Module):
    """Backbone and neck: ``extract_feat`` of a detector or segmentor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _flatten(self.model.extract_feat(x))


class SegmentorLogits(nn.Module):
    """A segmentor's whole inference: ``encode_decode``, logits at the input size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        metas = [dict(img_shape=x.shape[2:], ori_shape=x.shape[2:], pad_shape=x.shape[2:])] * x.shape[0]
        return self.model.encode_decode(x, metas)


class TensorForward(nn.Module):
    """``forward(mode='tensor')``: a single-stage detector's raw head outputs, a classifier's
    logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _flatten(self.model(x, mode='tensor'))


def exportable(model: nn.Module, part: str) -> nn.Module:
    """The module whose ``forward(images)`` becomes the graph."""
    if part == 'backbone':
        return Backbone(model)
    if part == 'features':
        if not hasattr(model, 'extract_feat'):
            raise ExportError(f'{type(model).__name__} has no extract_feat; export --part backbone or model')
        return Features(model)
    from mmdet.models.detectors import TwoStageDetector
    if isinstance(model, TwoStageDetector):
        raise ExportError(
            f'{type(model).__name__}: its RPN proposals (NMS, top-k over a data-dependent number of boxes) and '
            f'RoI heads (RoIAlign over them) have no faithful standard-ONNX export; export --part features '
            '(backbone + neck) and run the heads outside the graph, see docs/export.md')
    from mmdet.models.detectors import DetectionTransformer
    if isinstance(model, DetectionTransformer):
        raise ExportError(
            f'{type(model).__name__}: its transformer reads per-image shapes and masks from the data samples '
            '(no tensor forward without them); export --part features (backbone + neck), see docs/export.md')
    if hasattr(model, 'encode_decode'):
        return SegmentorLogits(model)
    return TensorForward(model)


def output_names(module: nn.Module, example: torch.Tensor) -> List[str]:
    with torch.no_grad():
        count = len(_flatten(module(example)))
    return ['output'] if count == 1 else [f'output{i}' for i in range(count)]


def _root_cause(error: BaseException, lines: int = 6) -> str:
    """The innermost exception of a chain (the exporters wrap the model's own), shortened."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = [line for line in str(error).strip().splitlines() if line.strip()][:lines]
    return f'{type(error).__name__}: ' + '\n  '.join(text)


def _frozen_value_warnings(caught) -> List[str]:
    found = [f'{osp.relpath(w.filename)}:{w.lineno}: {str(w.message).split(".")[0]}' for w in caught
             if issubclass(w.category, torch.jit.TracerWarning) and FROZEN_VALUE.search(str(w.message))]
    return list(dict.fromkeys(found))


def check_standard_ops(path: str):
    """Raises ``ExportError`` naming every node outside the standard ONNX domains."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    nodes, stack = [], [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            nodes.append(node)
            stack.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    custom = sorted({f'{n.domain}::{n.op_type}' for n in nodes if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ExportError(f'the graph holds ops without a standard ONNX definition: {", ".join(custom)} '
                          '(onnxruntime runs them only with a custom-op library)')


def export(module: nn.Module, example: torch.Tensor, out: str, opset: int = 18, dynamo: bool = False) -> Dict:
    """Writes ``module`` (``forward(images) -> tensors``) to ``out``. Returns the output names
    and the export time in seconds."""
    if opset < 16:
        raise ValueError(f'opset {opset} has no GridSample (the deformable attention samples with it): use >= 16')
    names = output_names(module, example)
    axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    axes.update({n: {0: 'batch'} for n in names})
    start = time.perf_counter()
    with reference_formulation(module), exportable_modules(module), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        try:
            if dynamo:
                # AUTO: the range of each size is what the model's code allows (its guards);
                # torch.export specialises sizes of 1, so the batch is traced at 2
                auto = torch.export.Dim.AUTO
                batch = example.expand(max(2, example.shape[0]), -1, -1, -1).contiguous()
                torch.onnx.export(module, (batch, ), out, dynamo=True, opset_version=opset, input_names=['input'],
                                  output_names=names, dynamic_shapes={'x': {0: auto, 2: auto, 3: auto}},
                                  external_data=False)
            else:
                torch.onnx.export(module, (example, ), out, dynamo=False, opset_version=opset,
                                  input_names=['input'], output_names=names, dynamic_axes=axes)
        except torch.onnx.errors.UnsupportedOperatorError as e:
            raise ExportError(f'an operator has no ONNX export: {e}') from e
        except Exception as e:
            if osp.exists(out):
                os.remove(out)
            raise ExportError(f'export failed: {_root_cause(e)}') from e
    seconds = time.perf_counter() - start
    try:
        frozen = _frozen_value_warnings(caught)
        if frozen:
            raise ExportError('the traced graph would keep values of the export input as constants (wrong at '
                              'any other size):\n  ' + '\n  '.join(frozen))
        check_standard_ops(out)
    except ExportError:
        os.remove(out)  # no file rather than a wrong one
        raise
    return dict(outputs=names, seconds=seconds)


def verify(module: nn.Module, path: str, shapes: Sequence[Tuple[int, int, int]],
           seed: int = 0) -> List[Tuple[Tuple[int, int, int], float]]:
    """Runs ``path`` with onnxruntime and ``module`` with PyTorch on the same random input at
    each ``(batch, height, width)``; returns ``(shape, largest absolute difference over all
    outputs)``."""
    import numpy as np
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    results = []
    generator = torch.Generator().manual_seed(seed)
    for batch, h, w in shapes:
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = _flatten(module(x))
        got = session.run(None, {'input': x.numpy()})
        if len(got) != len(expected):
            raise ExportError(f'onnxruntime returned {len(got)} outputs, PyTorch {len(expected)}')
        diffs = []
        for e, g in zip(expected, got):
            if tuple(e.shape) != g.shape:
                raise ExportError(f'at {h}x{w}: output shape {g.shape} from onnxruntime, {tuple(e.shape)} from PyTorch')
            diffs.append(float(np.abs(e.numpy().astype(np.float64) - g.astype(np.float64)).max()))
        results.append(((batch, h, w), max(diffs)))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import mmdat  # noqa: F401  (DAT, and `mmdat::` bases, before the config is read)
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
        import mmdat  # noqa: F401
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = tempfile.gettempdir()
    model = build_model(cfg, args.checkpoint)
    module = exportable(model, args.part).eval()
    h, w = args.shape
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    info = export(module, example, args.out, args.opset, args.dynamo)
    print(f'exported {args.part} of {args.config} at {h}x{w} to {args.out} in {info["seconds"]:.1f} s '
          f'(opset {args.opset}, {"dynamo" if args.dynamo else "TorchScript"} exporter, '
          f'{len(info["outputs"])} outputs, {osp.getsize(args.out) / 2**20:.1f} MB)')
    if not args.verify:
        return 0
    # the export's input, then each other size at a batch of 2 (the batch axis is dynamic too)
    shapes = [(1, h, w)] + [(2, *s) for s in (args.verify_shape or [(h + 64, w + 32)])]
    failed = False
    for (b, vh, vw), diff in verify(module, args.out, shapes):
        ok = diff <= args.atol
        failed |= not ok
        print(f'verify {b}x3x{vh}x{vw}: max abs diff {diff:.3g} ({"ok" if ok else "FAILED"}, atol {args.atol:g})')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
