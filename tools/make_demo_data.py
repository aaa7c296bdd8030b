"""Write the synthetic shapes dataset of the demo (see mmdat/datasets/shapes.py).

    python tools/make_demo_data.py [--root data/shapes] [--num-train 400] [--num-val 100] ...

Deterministic: the same arguments give the same files. Returns at once when ``--root``
already holds a complete copy made with the same arguments (``--force`` rebuilds it).
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmdat.datasets.shapes import make_shapes_dataset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description='Generate the synthetic shapes dataset')
    parser.add_argument('--root', default='data/shapes')
    parser.add_argument('--num-train', type=int, default=400, help='scenes of the train split')
    parser.add_argument('--num-val', type=int, default=100, help='scenes of the val split')
    parser.add_argument('--img-size', type=int, default=128, help='side of the scenes')
    parser.add_argument('--max-shapes', type=int, default=4, help='shapes per scene, at most')
    parser.add_argument('--num-cls-train', type=int, default=300, help='classification train images')
    parser.add_argument('--num-cls-val', type=int, default=90, help='classification val images')
    parser.add_argument('--cls-img-size', type=int, default=48, help='side of the classification images')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rebuild even if an identical copy exists')
    args = parser.parse_args(argv)
    start = time.time()
    root = make_shapes_dataset(args.root, num_train=args.num_train, num_val=args.num_val, img_size=args.img_size,
                               max_shapes=args.max_shapes, num_cls_train=args.num_cls_train,
                               num_cls_val=args.num_cls_val, cls_img_size=args.cls_img_size, seed=args.seed,
                               force=args.force)
    print(f'shapes dataset ready under {root} ({time.time() - start:.1f} s)')


if __name__ == '__main__':
    main()
