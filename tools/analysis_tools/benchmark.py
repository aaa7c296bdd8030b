"""Images per second of a config's model on random images (no dataset needed).

    python tools/analysis_tools/benchmark.py CONFIG [--shape H W] [--batch-size 1] [--iters 20]
        [--warmup 3] [--device cpu|cuda] [--amp] [--train]

Inference times the model's tensor forward (backbone, neck, heads; mmdet's post-processing
such as NMS is excluded), the path get_flops.py counts; ``--train`` times a whole training
step (forward, backward and an SGD update) of the backbone and neck, through the same data
preprocessor. The model is built with get_flops.py's builder, so shapes and padding agree
with the FLOP counts.
"""
import argparse
import importlib.util
import os.path as osp
import time
from functools import partial

import torch

_spec = importlib.util.spec_from_file_location('get_flops', osp.join(osp.dirname(__file__), 'get_flops.py'))
get_flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_flops)


def benchmark(config: str, shape=None, batch_size: int = 1, iters: int = 20, warmup: int = 3,
              device: str = 'cpu', amp: bool = False, train: bool = False) -> float:
    """Returns images per second."""
    from mmengine.config import Config

    import mmdat  # noqa: F401
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    scope = cfg.get('default_scope')
    hw = get_flops.input_shape(shape, scope)
    model = get_flops.build_model(cfg, scope).to(device)
    images = [(torch.rand(3, *hw) * 255).to(torch.uint8) for _ in range(batch_size)]
    with torch.no_grad():
        data = model.data_preprocessor(
            dict(inputs=images, data_samples=[get_flops.data_sample(scope, hw) for _ in images]), False)
    inputs = data['inputs'].to(device)
    if train:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

        def step():
            feats = model.extract_feat(inputs)
            sum(f.float().mean() for f in (feats if isinstance(feats, (list, tuple)) else [feats])).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        forward = partial(model.forward, data_samples=data['data_samples'], mode='tensor') \
            if scope == 'mmdet' else partial(model.forward, mode='tensor')

        def step():
            with torch.no_grad():
                forward(inputs)

    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    with torch.autocast(device.split(':')[0], dtype=torch.float16 if device.startswith('cuda') else torch.bfloat16,
                        enabled=amp):
        for _ in range(warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
    return batch_size * iters / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Images per second of a config (random images)')
    parser.add_argument('config', help='a config with a DAT (or any) backbone: mmdet, mmseg or mmpretrain')
    parser.add_argument('--shape', type=int, nargs='+', help='H W (default: the paper\'s FLOPs shape)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='random images per step; images/s counts all of them (default: 1)')
    parser.add_argument('--iters', type=int, default=20, help='timed steps, after the warm-up (default: 20)')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed steps first (allocator, kernel builds, autotuning; default: 3)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where the model runs (default: cuda when available, else cpu)')
    parser.add_argument('--amp', action='store_true', help='fp16 autocast on CUDA, bf16 on CPU')
    parser.add_argument('--train', action='store_true', help='time training steps of backbone + neck')
    args = parser.parse_args(argv)
    ips = benchmark(args.config, args.shape, args.batch_size, args.iters, args.warmup, args.device,
                    args.amp, args.train)
    mode = 'train' if args.train else 'inference'
    print(f'{osp.basename(args.config)}: {ips:.2f} images/s ({mode}, batch {args.batch_size}, '
          f'{args.device}{", amp" if args.amp else ""})')


if __name__ == '__main__':
    main()
