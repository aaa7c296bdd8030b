"""Draw the learned deformable sampling points over an image (DAT paper, Figure 4).

    python tools/analysis_tools/visualize_sampling_points.py CONFIG IMAGE --checkpoint CKPT \
        [--out points.png] [--stages 2 3] [--max-side 1333]

For the last deformable block of each chosen stage (0-based; the paper shows stages 3 and 4,
i.e. 2 and 3), every offset group's deformed key positions are drawn over the image as the
backbone saw it (resized, normalised as the config's data preprocessor does). Group ``g`` has
the same colour in every panel, and every panel has its own legend. Works for any config
whose model has a DAT backbone.
"""
import argparse
import os.path as osp

import matplotlib
import numpy as np
import torch

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def load_backbone(config: str, checkpoint: str = None, cfg_options=None):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    import mmdat  # noqa: F401
    from mmdat.models import DAT

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmengine.registry import MODELS
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu')
    backbone = model.backbone if hasattr(model, 'backbone') else model
    if not isinstance(backbone, DAT):
        raise SystemExit(f'error: {config} has no DAT backbone')
    preprocessor = cfg.model.get('data_preprocessor', {})
    mean = np.array(preprocessor.get('mean', [123.675, 116.28, 103.53]), dtype=np.float32)
    std = np.array(preprocessor.get('std', [58.395, 57.12, 57.375]), dtype=np.float32)
    return backbone.eval(), mean, std


def sampling_points(backbone, image: np.ndarray, mean, std, stages):
    """Image-pixel (x, y) of every group's keys in the last D block of each stage."""
    from mmdat.models.layers import DeformableAttention
    x = torch.from_numpy((image.astype(np.float32) - mean) / std).permute(2, 0, 1)[None]
    found, hooks = {}, []
    for i in stages:
        attns = [b.attn for b in backbone.stages[i].blocks if isinstance(b.attn, DeformableAttention)]
        if not attns:
            raise SystemExit(f'error: stage {i} has no deformable attention block')
        attn = attns[-1]

        def hook(module, inputs, output, i=i, attn=attn):
            found[i] = (attn.sampling_positions(output).detach(), inputs[0].shape[-2:], attn.groups)
        hooks.append(attn.offset.register_forward_hook(hook))
    with torch.no_grad():
        backbone.forward_stages(x, max(stages) + 1)
    for h in hooks:
        h.remove()
    H, W = image.shape[:2]
    points = {}
    for i, (pos, (h, w), groups) in found.items():
        # grid_sample(align_corners=True): -1 / +1 are the centres of the map's first / last pixel
        py = (pos[..., 0] + 1) / 2 * (h - 1)
        px = (pos[..., 1] + 1) / 2 * (w - 1)
        stride_y, stride_x = H / h, W / w
        ys = (py + 0.5) * stride_y - 0.5
        xs = (px + 0.5) * stride_x - 0.5
        points[i] = [(xs[g].flatten().numpy(), ys[g].flatten().numpy()) for g in range(groups)]
    return points


def group_colour(group: int, num_colours: int):
    """The colour of offset group ``group``: one scale for every panel, so a group's colour
    means the same in each (tab10, or tab20 past 10 groups)."""
    cmap = plt.cm.tab10 if num_colours <= 10 else plt.cm.tab20
    return cmap(group % cmap.N)


def draw_sampling_points(image: np.ndarray, points: dict, stages) -> 'plt.Figure':
    """One panel per stage: the image with each group's sampling points; each panel has its
    own legend of the groups it draws."""
    num_colours = max(len(points[stage]) for stage in stages)
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ax.imshow(image)
        for g, (xs, ys) in enumerate(points[stage]):
            ax.scatter(xs, ys, s=6, color=group_colour(g, num_colours), label=f'group {g}')
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f'stage {stage + 1}: deformed keys')
        ax.axis('off')
        ax.legend(loc='lower right', fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


def main(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Draw DAT deformable sampling points over an image')
    parser.add_argument('config', help='a config whose model has a DAT backbone')
    parser.add_argument('image', help='the image to draw on')
    parser.add_argument('--checkpoint', help='trained weights (mmdat / mmengine checkpoint)')
    parser.add_argument('--out', default='sampling_points.png', help='the picture to write')
    parser.add_argument('--stages', type=int, nargs='+', default=[2, 3],
                        help='0-based stages to draw, one panel each (their last D block)')
    parser.add_argument('--max-side', type=int, default=1333, help='resize so the longer side is at most this')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='config overrides, key=value')
    args = parser.parse_args(argv)

    import mmcv
    if not osp.isfile(args.image):
        raise SystemExit(f'error: no such image: {args.image}')
    image = mmcv.imread(args.image, channel_order='rgb')
    if image is None:
        raise SystemExit(f'error: cannot decode image: {args.image}')
    scale = min(1.0, args.max_side / max(image.shape[:2]))
    if scale < 1:
        image = mmcv.imrescale(image, scale)
    backbone, mean, std = load_backbone(args.config, args.checkpoint, args.cfg_options)
    points = sampling_points(backbone, image, mean, std, args.stages)

    fig = draw_sampling_points(image, points, args.stages)
    fig.savefig(args.out, dpi=120, bbox_inches='tight')
    plt.close(fig)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
