"""Convert an official DAT / DAT++ checkpoint to mmdat's layout.

    python tools/model_converters/dat2mmdat.py SRC DST

SRC may be a LeapLabTHU/DAT classification checkpoint (``{'model': ...}``) or a
DAT-Detection / DAT-Segmentation checkpoint (``{'state_dict': ...}``). DST holds
``{'state_dict': ..., 'meta': ...}`` with backbone keys under ``backbone.`` (a classifier's
head under ``head.fc.``, as mmpretrain's ``LinearClsHead``; a detector's or segmentor's other
keys unchanged), usable as ``load_from`` of an mmdat config or as the backbone's
``init_cfg=dict(type='Pretrained', checkpoint=DST)``.
"""
import argparse
import os
import sys

import torch

from mmdat.models.backbones.dat_checkpoint import convert_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.src):
        sys.exit(f'error: no such checkpoint: {args.src}')
    try:
        checkpoint = torch.load(args.src, map_location='cpu', weights_only=True)
        state_dict = convert_checkpoint(checkpoint)
    except Exception as e:  # a readable one-line error instead of a torch/pickle traceback
        sys.exit(f'error: cannot convert {args.src}: {type(e).__name__}: {e}')
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': os.path.basename(args.src)}}, args.dst)
    n_backbone = sum(k.startswith('backbone.') for k in state_dict)
    print(f'wrote {args.dst}: {n_backbone} backbone tensors, {len(state_dict) - n_backbone} others')


if __name__ == '__main__':
    main()
