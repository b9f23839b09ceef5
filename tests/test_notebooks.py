"""One pytest test per notebook: each runs in its own process through `nbdev.test.test_nb`, skipping `tst_flags` cells."""
import os, subprocess, sys
from configparser import ConfigParser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_')) + [ROOT/'index.ipynb']
TIMEOUT = int(os.environ.get('AGENT_DISTILLATION_NB_TIMEOUT', 900))  # seconds per notebook

def _flags():
    cfg = ConfigParser(); cfg.read(ROOT/'settings.ini')
    return cfg['DEFAULT'].get('tst_flags', '').split()

RUNNER = """
import sys
from pathlib import Path
from nbdev.test import test_nb
ok, secs = test_nb(Path(sys.argv[1]), skip_flags=sys.argv[2].split(), do_print=False, showerr=True)
print(f'{sys.argv[1]}: {secs:.1f}s')
sys.exit(0 if ok else 1)
"""

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook(nb):
    "The notebook runs top to bottom (flagged heavy cells skipped) within its time limit."
    try:
        r = subprocess.run([sys.executable, '-c', RUNNER, str(nb), ' '.join(_flags())], cwd=nb.parent,
                           capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f'{nb.name} did not finish within {TIMEOUT}s')
    assert r.returncode == 0, f'{nb.name} failed:\n{r.stderr[-8000:]}\n{r.stdout[-2000:]}'
