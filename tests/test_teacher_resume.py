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

SCRIPT_ALL = r'''
import sys, time
from agent_distillation.core import Example
from agent_distillation.models import ScriptedLM
from agent_distillation.sandbox import Sandbox
from agent_distillation.teacher import generate_all
exs = [Example(f"q{i}", f"What is {i} + {i}?", str(2 * i), "fact", "toy") for i in range(int(sys.argv[2]))]
def slow(messages, prefix, i):
    time.sleep(0.2)
    q = messages[-1]["content"].split("What is ")[1].split(" +")[0]
    if "Think step by step" in messages[0]["content"]: return f"Plan: add {q} to itself.\n\n<answer>{2 * int(q)}</answer>"
    return ("" if prefix else "Thought: add.") + f"\n```py\nfinal_answer({q} + {q})\n```"
generate_all(exs, ScriptedLM(slow), lambda: Sandbox(), sys.argv[1], workers=3)
'''

def test_all_modes_sigkill_then_resume(tmp_path):
    "`generate_all` killed mid-run and restarted: every mode has every question once, each FTP run starts from its CoT."
    n, files = 12, [tmp_path/f'{m}.jsonl' for m in ('cot', 'agent', 'agent_ftp')]
    run = lambda: subprocess.Popen([sys.executable, '-c', SCRIPT_ALL, str(tmp_path), str(n)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = lambda: sum(f.read_text().count('\n') for f in files if f.exists())
    p, deadline = run(), time.time() + 120
    while time.time() < deadline and lines() < 8: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert 8 <= lines() < 3 * n, f'the kill should land mid-run, found {lines()} records'
    with open(files[2], 'ab') as f: f.write(b'{"id": "q0", "torn')
    p = run(); assert p.wait(timeout=300) == 0
    recs = {f.stem: [json.loads(l) for l in f.read_text().splitlines()] for f in files}
    for mode, rs in recs.items(): assert sorted(r['id'] for r in rs) == sorted(f'q{i}' for i in range(n)), mode
    from agent_distillation.prompts import first_thought_prefix
    cot = {r['id']: r['cot'] for r in recs['cot']}
    for r in recs['agent_ftp']:
        assert r['prefix'] == first_thought_prefix(cot[r['id']]) and r['prefix'].startswith('Thought: Plan:')
        assert r['messages'][2]['content'].startswith(r['prefix']) and r['final_answer'] == 2 * int(r['id'][1:])
    assert all(r['prefix'] is None and r['final_answer'] == 2 * int(r['id'][1:]) for r in recs['agent'])

def test_all_modes_interrupt_drops_the_queue(tmp_path):
    "An interrupt inside `generate_all` ends it after the requests in flight; the queued ones are not run."
    from agent_distillation.core import Example, read_jsonl
    from agent_distillation.models import ScriptedLM
    from agent_distillation.sandbox import Sandbox
    from agent_distillation.teacher import generate_all
    exs = [Example(f'q{i}', f'What is {i} + {i}?', str(2 * i), 'fact', 'toy') for i in range(20)]
    def lm(messages, prefix, i):
        q = messages[-1]['content'].split('What is ')[1].split(' +')[0]
        if q == '3': raise KeyboardInterrupt
        time.sleep(0.05)
        return f'<answer>{2 * int(q)}</answer>' if 'Think step by step' in messages[0]['content'] else f'Thought: add.\n```py\nfinal_answer({q} + {q})\n```'
    t0 = time.time()
    try: generate_all(exs, ScriptedLM(lm), lambda: Sandbox(), tmp_path, workers=2); raise AssertionError('the interrupt was swallowed')
    except KeyboardInterrupt: pass
    written = sum(len(read_jsonl(tmp_path/f'{m}.jsonl')) for m in ('cot', 'agent', 'agent_ftp') if (tmp_path/f'{m}.jsonl').exists())
    assert written < 15, written  # what came before q3 and what was in flight, not the 60 units
    assert time.time() - t0 < 10

def test_all_modes_order_and_concurrency(tmp_path):
    "`generate_all` keeps `workers` requests in flight, takes questions in order, and runs a question's FTP next to it."
    import threading
    from agent_distillation.core import Example
    from agent_distillation.models import ScriptedLM
    from agent_distillation.sandbox import Sandbox
    from agent_distillation.teacher import generate_all
    exs = [Example(f'q{i}', f'What is {i} + {i}?', str(2 * i), 'fact', 'toy') for i in range(6)]
    active, peak, lock = [0], [0], threading.Lock()
    def lm(messages, prefix, i):
        with lock: active[0] += 1; peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock: active[0] -= 1
        q = messages[-1]['content'].split('What is ')[1].split(' +')[0]
        if 'Think step by step' in messages[0]['content']: return f'Add.\n\n<answer>{2 * int(q)}</answer>'
        return ('' if prefix else 'Thought: add.') + f'\n```py\nfinal_answer({q} + {q})\n```'
    order = []
    generate_all(exs, ScriptedLM(lm), lambda: Sandbox(), tmp_path/'one', workers=1, on_record=lambda m, r: order.append((m, r['id'])))
    assert order == [(m, f'q{i}') for i in range(6) for m in ('cot', 'agent_ftp', 'agent')]
    assert peak[0] == 1
    generate_all(exs, ScriptedLM(lm), lambda: Sandbox(), tmp_path/'three', workers=3)
    assert 2 <= peak[0] <= 3  # never more than `workers` at once
