"""The README says what the code does: its snippets run, its commands name scripts that
exist and take the options shown, its links and pictures exist, its demo figures are the
recorded run's."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import torch

from conftest import DET_CFG, REPO, subprocess_env

README = open(osp.join(REPO, 'README.md')).read()


def code_blocks(lang: str):
    return re.findall(rf'```{lang}\n(.*?)```', README, re.S)


def python_block(marker: str) -> str:
    found = [b for b in code_blocks('python') if marker in b]
    assert len(found) == 1, f'the README should have one python block with {marker!r}'
    return found[0]


def command_lines():
    """Every command of the README's bash blocks, as a list of words (comments dropped)."""
    for block in code_blocks('bash'):
        for line in block.splitlines():
            words = line.split('#', 1)[0].split()
            if words:
                yield words


def test_commands_name_real_scripts_and_options():
    scripts, make_targets = {}, set()
    for words in command_lines():
        if words[0] == 'make':
            make_targets.add(words[1])
            continue
        if words[0].endswith('python'):
            words = words[1:]
        script = words[0]
        assert osp.isfile(osp.join(REPO, script)), f'README runs {script}, which does not exist'
        if script.endswith('.sh'):
            assert os.access(osp.join(REPO, script), os.X_OK), f'{script} is not executable'
        else:
            scripts.setdefault(script, set()).update(w.split('=')[0] for w in words if w.startswith('--'))
    for script in re.findall(r'\btools/[\w/]+\.(?:py|sh)\b', README):
        assert osp.isfile(osp.join(REPO, script)), f'README names {script}, which does not exist'
    makefile = open(osp.join(REPO, 'Makefile')).read()
    for target in make_targets | set(re.findall(r'`make ([\w-]+)`', README)):
        assert re.search(rf'^{target}:', makefile, re.M), f'README mentions make {target}; the Makefile has none'
    assert {'demo', 'test'} <= make_targets

    # every python script answers --help (one interpreter for all) and knows the options shown
    runner = ('import contextlib, io, json, runpy, sys\n'
              'out = {}\n'
              'for path in sys.argv[1:]:\n'
              '    sys.argv = [path, "--help"]\n'
              '    buf = io.StringIO()\n'
              '    code = None\n'
              '    try:\n'
              '        with contextlib.redirect_stdout(buf):\n'
              '            runpy.run_path(path, run_name="__main__")\n'
              '    except SystemExit as e:\n'
              '        code = e.code\n'
              '    out[path] = [code, buf.getvalue()]\n'
              'print("HELP" + json.dumps(out))\n')
    proc = subprocess.run([sys.executable, '-c', runner, *[osp.join(REPO, s) for s in scripts]], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.split('HELP', 1)[1])
    for script, used in scripts.items():
        code, text = helps[osp.join(REPO, script)]
        assert code in (0, None) and 'usage:' in text, (script, code, text[-500:])
        for option in used:
            assert option in text, f'README gives {script} {option}, which its --help does not list'


def test_links_and_pictures_exist():
    for target in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', README) + re.findall(r'<img src="([^"]+)"', README):
        if target.startswith('http'):
            continue
        assert osp.exists(osp.join(REPO, target)), f'README links {target}, which does not exist'
    for picture in re.findall(r'<img src="([^"]+)"', README):
        assert os.path.getsize(osp.join(REPO, picture)) < 200 * 1024, f'{picture} is over 200 KB'
    assert 'arxiv.org/abs/2201.00520' in README and 'arxiv.org/abs/2309.01430' in README


def test_results_table_names_real_configs():
    rows = re.findall(r'^\| DAT-\S+ \| .+? \| `(\w+)` \|', README, re.M)
    assert rows, 'README has no results table'
    for name in rows:
        assert osp.isfile(osp.join(REPO, 'configs', name + '.py')), name


def test_demo_figures_are_the_recorded_run():
    """The demo figures the README quotes are those of docs/demo.md's recorded run (the table
    tools/run_demo.py --record writes), each quoted once."""
    docs = open(osp.join(REPO, 'docs', 'demo.md')).read()
    recorded = docs.split('<!-- demo-results:start -->\n', 1)[1].split('<!-- demo-results:end -->', 1)[0]
    if recorded.strip():
        assert recorded.startswith('| model | iterations | metric |'), recorded
    demo_text = README.split('### Two commands', 1)[1].split('### Quick start', 1)[0]
    quoted = re.findall(r'(?:bbox mAP|segm mAP|mIoU|AP50)\W+(\d+\.\d+)', demo_text)
    for figure in quoted:
        assert figure in recorded, f'README quotes the demo figure {figure}, which the recorded run does not have'
    for row in (line for line in recorded.splitlines() if line.startswith('| ') and 'DAT' in line):
        assert README.count(row) <= 1, f'README quotes the recorded row more than once: {row}'


def test_backbone_snippet():
    namespace = {}
    exec(python_block('from mmdat.models import DAT'), namespace)
    shapes = [tuple(f.shape) for f in namespace['feats']]
    assert shapes == [(1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7)]
    reference = namespace['reference']
    with torch.no_grad():
        out = reference(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in out][-1] == (1, 512, 2, 2)


def test_inherit_snippet(tmp_path):
    from mmengine.config import Config

    import mmdat  # noqa: F401
    path = tmp_path / 'my_config.py'
    path.write_text(python_block("_base_ = 'mmdat::"))
    cfg = Config.fromfile(str(path))
    assert cfg.model.backbone.type == 'DAT' and cfg.model.backbone.arch == 'pp-tiny'
    assert cfg.model.roi_head.bbox_head.num_classes == 3 and cfg.model.roi_head.mask_head.num_classes == 3


def test_inference_snippet(tmp_path):
    """The README's DetInferencer lines, run on the demo detector with random weights."""
    import mmcv
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    import mmdat  # noqa: F401
    cfg = Config.fromfile(DET_CFG)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    weights = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, weights)
    image = str(tmp_path / 'demo.jpg')
    mmcv.imwrite((np.random.RandomState(0).rand(96, 128, 3) * 255).astype(np.uint8), image)

    snippet = python_block('DetInferencer(')
    for placeholder, value in (("'configs/mask_rcnn_datpp_t_3x.py'", repr(DET_CFG)),
                               ("'mask_rcnn_datpp_t_3x.pth'", repr(weights)), ("'demo.jpg'", repr(image)),
                               ("'outputs'", repr(str(tmp_path / 'outputs')))):
        assert placeholder in snippet, placeholder
        snippet = snippet.replace(placeholder, value)
    namespace = {}
    exec(snippet, namespace)
    assert len(namespace['result']['predictions']) == 1
    assert osp.isfile(tmp_path / 'outputs' / 'vis' / 'demo.jpg')
