"""``LoadImageFromFileOrSkip``: image loading that names a corrupt or truncated file.

mmcv's ``LoadImageFromFile`` stops a whole training on the first unreadable image with an
``AssertionError: failed to load image`` (undecodable bytes) or, worse, trains on a
silently half-grey picture (OpenCV decodes a truncated JPEG without an error).

This transform loads like ``LoadImageFromFile`` and additionally checks that a JPEG ends
with its EOI marker and a PNG with its ``IEND`` chunk. When a file cannot be read, decoded,
or is truncated, it

* ``on_error='skip'`` (default): logs a warning naming the file and the reason, records it
  in ``self.skipped`` and returns ``None``. MMEngine's ``BaseDataset`` then draws another
  sample (training), so the run goes on and the bad file is reported in the log;
  in test mode MMEngine refuses a ``None`` sample, so evaluation stops (after the warning
  naming the file);
* ``on_error='raise'``: raises ``OSError('corrupt or truncated image: <path> (<reason>)')``,
  which stops the run with the file's name.

Use it in a pipeline in place of ``LoadImageFromFile``::

    dict(type='LoadImageFromFileOrSkip', backend_args=None)        # or on_error='raise'

It is registered in mmcv's ``TRANSFORMS``, which mmdet, mmseg and mmpretrain pipelines
fall back to.
"""
from typing import Optional

import mmcv
import mmengine.fileio as fileio
import numpy as np
from mmcv.transforms import LoadImageFromFile
from mmcv.transforms.builder import TRANSFORMS
from mmengine.logging import print_log

__all__ = ['LoadImageFromFileOrSkip', 'image_bytes_problem']


def image_bytes_problem(data: bytes) -> Optional[str]:
    """Why the bytes of a JPEG / PNG file are truncated, or ``None`` when they look whole."""
    if not data:
        return 'empty file'
    if data[:3] == b'\xff\xd8\xff':
        # EOI marker, possibly followed by padding bytes
        if b'\xff\xd9' not in data[-64:]:
            return 'truncated JPEG (no end-of-image marker)'
    elif data[:8] == b'\x89PNG\r\n\x1a\n':
        if b'IEND' not in data[-32:]:
            return 'truncated PNG (no IEND chunk)'
    return None


@TRANSFORMS.register_module()
class LoadImageFromFileOrSkip(LoadImageFromFile):
    """``LoadImageFromFile`` that reports corrupt / truncated images by file name.

    Args:
        on_error: ``'skip'`` (warn, return ``None`` so the dataset draws another sample) or
            ``'raise'`` (``OSError`` naming the file).
        **kwargs: as for mmcv's ``LoadImageFromFile``.
    """

    def __init__(self, on_error: str = 'skip', **kwargs):
        if on_error not in ('skip', 'raise'):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        super().__init__(**kwargs)
        self.on_error = on_error
        self.skipped = []

    def _fail(self, filename: str, reason: str):
        message = f'corrupt or truncated image: {filename} ({reason})'
        if self.on_error == 'raise':
            raise OSError(message)
        self.skipped.append((filename, reason))
        print_log(f'{message}; skipped', logger='current', level=30)
        return None

    def transform(self, results: dict) -> Optional[dict]:
        filename = results['img_path']
        try:
            if self.file_client_args is not None:
                img_bytes = fileio.FileClient.infer_client(self.file_client_args, filename).get(filename)
            else:
                img_bytes = fileio.get(filename, backend_args=self.backend_args)
        except Exception as e:  # missing file, permission, backend error
            return self._fail(filename, f'{type(e).__name__}: {e}')
        problem = image_bytes_problem(img_bytes)
        if problem is not None:
            return self._fail(filename, problem)
        try:
            img = mmcv.imfrombytes(img_bytes, flag=self.color_type, backend=self.imdecode_backend)
        except Exception as e:
            return self._fail(filename, f'{type(e).__name__}: {e}')
        if img is None or img.size == 0:
            return self._fail(filename, 'could not be decoded')
        if self.to_float32:
            img = img.astype(np.float32)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results

    def __repr__(self):
        return super().__repr__()[:-1] + f", on_error='{self.on_error}')"
