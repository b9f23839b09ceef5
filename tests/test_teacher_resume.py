"""A teacher run killed with SIGKILL mid-way resumes without losing or duplicating a record."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

SCRIPT = r'''
import sys, time
from agent_distillation.core import Example
from agent_distillation.models import ScriptedLM
from agent_distillation.sandbox import Sandbox
from agent_distillation.teacher import generate_trajectories
exs = [Example(f"q{i}", f"What is {i} + {i}?", str(2 * i), "math", "toy") for i in range(int(sys.argv[2]))]
def slow(messages, prefix, i):
    time.sleep(0.3)  # a slow teacher, so the kill lands mid-run
    q = messages[-1]["content"].split("What is ")[1].split(" +")[0]
    return f"Thought: add.\n```py\nfinal_answer({q} + {q})\n```"
generate_trajectories(exs, ScriptedLM(slow), lambda: Sandbox(), sys.argv[1], workers=2)
'''

def _run(out, n):
    return subprocess.Popen([sys.executable, '-c', SCRIPT, str(out), str(n)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def test_sigkill_then_resume(tmp_path):
    out, n = tmp_path/'agent.jsonl', 16
    p = _run(out, n)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count('\n') < 4): time.sleep(0.1)
    p.send_signal(signal.SIGKILL); p.wait()
    first = out.read_text().count('\n')
    assert 4 <= first < n, f'the kill should land mid-run, found {first} records'
    with open(out, 'ab') as f: f.write(b'{"id": "q99", "torn')  # what a kill in the middle of a write leaves
    p = _run(out, n); assert p.wait(timeout=300) == 0
    lines = out.read_bytes().split(b'\n')
    assert lines[-1] == b'', 'the file ends with a complete line'
    recs = [json.loads(l) for l in lines[:-1]]
    ids = [r['id'] for r in recs]
    assert sorted(ids) == sorted(f'q{i}' for i in range(n)), 'every example exactly once, the torn line gone'
    assert all(r['correct'] for r in recs)

def test_interrupt_drops_the_queue(tmp_path):
    "Ctrl-C (or SIGTERM, which the teacher run turns into it) ends a phase after the examples in flight, not the whole queue."
    from agent_distillation.teacher import _run_resumable
    from agent_distillation.core import read_jsonl, Example
    exs = [Example(f'q{i}', 'q', 'a', 'fact', 'test') for i in range(20)]
    def work(e, _):
        if e.id == 'q3': raise KeyboardInterrupt
        time.sleep(0.05); return dict(id=e.id)
    t0 = time.time()
    try: _run_resumable(exs, work, tmp_path/'o.jsonl', workers=2); raise AssertionError('the interrupt was swallowed')
    except KeyboardInterrupt: pass
    done = [r['id'] for r in read_jsonl(tmp_path/'o.jsonl')]
    assert 'q3' not in done and len(done) <= 5, done  # q0-q2 and at most the one other in flight, not all 19
    assert time.time() - t0 < 5
