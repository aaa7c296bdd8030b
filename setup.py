"""mmdat: Deformable Attention Transformer (DAT, DAT++) for the OpenMMLab 2.x stack."""
import os.path as osp

from setuptools import find_packages, setup


def read_version() -> str:
    namespace: dict = {}
    with open(osp.join(osp.dirname(__file__), 'mmdat', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='mmdat',
    version=read_version(),
    description='Deformable Attention Transformer (DAT, DAT++) backbones for '
    'mmdet, mmsegmentation and mmpretrain',
    long_description=open('README.md').read() if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(exclude=('tests', 'tests.*', 'tools', 'tools.*')),
    include_package_data=True,
    package_data={'mmdat': ['.mim/configs/**/*.py', '.mim/configs/*.py']},
    install_requires=[
        'torch>=2.0',
        'mmengine>=0.10.7,<1.0',
        # mmdet 3.3 and mmseg 1.2 refuse mmcv >= 2.2 at import time.
        'mmcv>=2.1.0,<2.2.0',
        'mmdet>=3.3.0,<3.4',
        'mmsegmentation>=1.2.2,<1.3',
        # imported by mmseg.utils at import time but not declared by mmsegmentation
        'ftfy',
        'regex',
        'mmpretrain>=1.2.0,<1.3',
        # mmengine's `pkg::` config inheritance imports pkg_resources.
        'setuptools>=77.0.3,<81',
    ],
    extras_require={
        'tests': ['pytest>=7', 'matplotlib', 'ruff==0.17.5'],
        'natten': ['natten'],
        # tools/deployment/pytorch2onnx.py: graph checks (onnx), --verify (onnxruntime) and
        # the dynamo exporter (onnxscript)
        'export': ['onnx>=1.16', 'onnxruntime>=1.17', 'onnxscript>=0.2'],
    },
    zip_safe=False,
)
