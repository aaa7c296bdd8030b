"""Run a trained mmdat model on your own image and save the picture with its predictions.

    python tools/inference_demo.py CONFIG CHECKPOINT IMAGE [--out-dir outputs] [--device cpu]

Detectors (mmdet) draw boxes and masks, segmentors (mmseg) the segmentation map,
classifiers (mmpretrain) the predicted class; the library is chosen from the config's
``default_scope``. The picture is written under ``OUT_DIR/vis/``.
"""
import argparse
import os.path as osp

INFERENCERS = {
    'mmdet': ('mmdet.apis', 'DetInferencer'),
    'mmseg': ('mmseg.apis', 'MMSegInferencer'),
    'mmpretrain': ('mmpretrain.apis', 'ImageClassificationInferencer'),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description='Run an mmdat model on an image and save the result')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('image')
    parser.add_argument('--out-dir', default='outputs')
    parser.add_argument('--device', default=None, help='cpu, cuda:0, ... (default: cuda when available)')
    args = parser.parse_args(argv)
    for path in (args.config, args.checkpoint, args.image):
        if not osp.isfile(path):
            raise SystemExit(f'error: no such file: {path}')

    from mmengine.config import Config

    import mmdat  # noqa: F401  registers DAT and resolves mmdat:: configs
    cfg = Config.fromfile(args.config)
    scope = cfg.get('default_scope', 'mmdet')
    if scope not in INFERENCERS:
        raise SystemExit(f'error: no inferencer for default_scope {scope!r}')
    module, name = INFERENCERS[scope]
    inferencer_cls = getattr(__import__(module, fromlist=[name]), name)
    cfg.model.backbone.init_cfg = None  # the checkpoint holds the trained backbone
    inferencer = inferencer_cls(model=cfg, weights=args.checkpoint, device=args.device)
    if scope == 'mmpretrain':
        result = inferencer(args.image, show_dir=osp.join(args.out_dir, 'vis'))[0]
        print(f"predicted class {result['pred_label']} ({result['pred_score']:.3f})")
    else:
        inferencer(args.image, out_dir=args.out_dir)
    print(f'wrote the picture under {osp.join(args.out_dir, "vis")}')


if __name__ == '__main__':
    main()
