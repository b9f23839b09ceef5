"""The repository is in sync: notebooks are clean, the package is exported from them, README.md is index.ipynb."""
import shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def _copy_repo(dst: Path) -> Path:
    "A copy of the tracked project files (no venv, no caches) to run nbdev commands on."
    for name in ['settings.ini', 'setup.py', 'index.ipynb', 'README.md']:
        if (ROOT/name).exists(): shutil.copy2(ROOT/name, dst/name)
    shutil.copytree(ROOT/'nbs', dst/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_*'))
    shutil.copytree(ROOT/'agent_distillation', dst/'agent_distillation', ignore=shutil.ignore_patterns('__pycache__'))
    return dst

def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file() and '__pycache__' not in p.parts}

def test_nbdev_clean_changes_nothing(tmp_path):
    "Committed notebooks are already cleaned (`make clean-nbs`)."
    d = _copy_repo(tmp_path)
    before = _tree(d/'nbs') | {'index.ipynb': (d/'index.ipynb').read_bytes()}
    subprocess.run([BIN/'nbdev_clean'], cwd=d, check=True, capture_output=True)
    subprocess.run([BIN/'nbdev_clean', '--fname', 'index.ipynb'], cwd=d, check=True, capture_output=True)
    after = _tree(d/'nbs') | {'index.ipynb': (d/'index.ipynb').read_bytes()}
    changed = [k for k in before if before[k] != after.get(k)]
    assert not changed, f'run `make clean-nbs` and commit: {changed}'

def test_nbdev_export_changes_nothing(tmp_path):
    "The package is exactly what the notebooks export (`make export`)."
    d = _copy_repo(tmp_path)
    before = _tree(d/'agent_distillation')
    subprocess.run([BIN/'nbdev_export'], cwd=d, check=True, capture_output=True)
    after = _tree(d/'agent_distillation')
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f'run `make export` and commit: {changed}'

def test_readme_matches_index(tmp_path):
    "README.md is index.ipynb converted to markdown (`make readme`)."
    subprocess.run([BIN/'jupyter', 'nbconvert', '--config', str(ROOT/'nbs'/'readme_nbconvert.py'), '--to', 'markdown', str(ROOT/'index.ipynb'), '--output-dir', str(tmp_path),
                    '--output', 'README', '--log-level', 'WARN'], check=True, capture_output=True)
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), 'README.md is stale: run `make readme`'

def test_no_shared_data_committed():
    "Benchmark question files are read from the data directory, never committed."
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True).stdout.split()
    data = {p.name for p in (ROOT.parent/'shared'/'data').rglob('*.json')} if (ROOT.parent/'shared'/'data').exists() else set()
    assert not [t for t in tracked if Path(t).name in data]
