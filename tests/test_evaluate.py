"""Guards for evaluation: resume after a crash (and a torn last line), records keyed by method, summary arithmetic,
and every method kind driven by a scripted model (CoT, CoT + RAG, agent ± FTP ± SAG with a real sandbox)."""
import json, math
import pytest
from agent_distillation.core import Example, read_jsonl
from agent_distillation.evaluate import AgentMethod, CoTMethod, Method, evaluate, markdown_table, results_table, summarize
from agent_distillation.models import ScriptedLM
from agent_distillation.prompts import format_action
from agent_distillation.retriever import Hit
from agent_distillation.sandbox import Sandbox

FACTS = [Example(f'f{i}', f'Who founded company {i}?', f'Person {i}', 'fact', 'world') for i in range(6)]
MATHS = [Example(f'm{i}', f'What is {i} + {i}?', float(2 * i), 'math', 'gsm_hard') for i in range(3)]

def _q(msgs) -> str: return msgs[-1]['content']

def cot_lm(right=lambda q: True):
    "A scripted CoT model: right answers in tags for facts and boxed for math, or wrong ones where `right` says so."
    def reply(msgs, prefix, i):
        q = _q(msgs)
        ex = next(e for e in FACTS + MATHS if e.question in q)
        ans = ex.answer if right(ex.id) else 'nobody'
        return f'Thinking. \\boxed{{{ans}}}' if ex.domain == 'math' else f'Thinking. <answer>{ans}</answer>'
    return ScriptedLM(reply)

class Crashing(Method):
    "Answers like `inner` but raises after `k` answers (a killed run)."
    def __init__(self, inner, k): self.inner, self.k, self.calls, self.name = inner, k, 0, inner.name
    def answer(self, e):
        if self.calls >= self.k: raise KeyboardInterrupt('killed')
        self.calls += 1
        return self.inner.answer(e)

def test_resume_after_crash_answers_only_the_rest(tmp_path):
    out, lm = tmp_path/'r.jsonl', cot_lm()
    with pytest.raises(KeyboardInterrupt): evaluate(Crashing(CoTMethod(lm, name='cot'), 2), FACTS, out=out, progress=False)
    assert len(read_jsonl(out)) == 2 and lm.i == 2
    with open(out, 'ab') as f: f.write(b'{"method": "cot", "source": "world", "id": "f2", "pred')   # torn by the kill
    df = evaluate(CoTMethod(lm, name='cot'), FACTS, out=out, progress=False)
    assert lm.i == 6 and list(df.id) == [e.id for e in FACTS] and df.acc.tolist() == [1.0] * 6
    recs = read_jsonl(out)
    assert sorted(r['id'] for r in recs) == [e.id for e in FACTS]          # no duplicates, torn line gone
    evaluate(CoTMethod(lm, name='cot'), FACTS, out=out, progress=False)      # all done: no model call
    assert lm.i == 6

def test_methods_share_a_file_by_name(tmp_path):
    out = tmp_path/'r.jsonl'
    evaluate(CoTMethod(cot_lm(), name='a'), FACTS[:2], out=out, progress=False)
    lm = cot_lm(lambda id: False)
    df = evaluate(CoTMethod(lm, name='b'), FACTS[:2], out=out, progress=False)
    assert lm.i == 2 and df.acc.tolist() == [0.0, 0.0] and len(read_jsonl(out)) == 4

def test_same_id_in_two_benchmarks_is_two_records():
    a, b = Example('1', 'Who founded company 1?', 'Person 1', 'fact', 'world'), Example('1', 'What is 1 + 1?', 2.0, 'math', 'gsm_hard')
    lm = ScriptedLM(lambda m, p, i: '<answer>Person 1</answer>' if 'company' in _q(m) else '\\boxed{2}')
    assert evaluate(CoTMethod(lm), [a, b], progress=False).acc.tolist() == [1.0, 1.0]

def test_workers_keep_order_and_records(tmp_path):
    lm = cot_lm(lambda id: id in ('f1', 'f4'))
    df = evaluate(CoTMethod(lm, name='cot'), FACTS, out=tmp_path/'r.jsonl', workers=3, progress=False)
    assert list(df.id) == [e.id for e in FACTS] and df.acc.tolist() == [0, 1, 0, 0, 1, 0]
    assert len(read_jsonl(tmp_path/'r.jsonl')) == 6

def test_summary_math():
    lm = cot_lm(lambda id: id in ('f0', 'f1', 'f2', 'm0'))
    df = evaluate(CoTMethod(lm, name='cot'), FACTS[:4] + MATHS[:2], progress=False)
    s = summarize(df)
    assert (s['world'], s['gsm_hard']) == (75.0, 50.0)
    assert s['avg'] == 62.5                                  # mean over benchmarks, not over the 6 questions (66.7)
    assert s['n'] == 6 and s['steps'] == 1.0 and s['retrievals'] == 0.0
    assert math.isclose(s['fact F1'], 75.0)
    assert s['gen. tokens'] == pytest.approx(df.completion_tokens.mean())
    t = results_table(df, evaluate(CoTMethod(cot_lm(), name='all right'), FACTS[:4] + MATHS[:2], progress=False))
    assert list(t.index) == ['cot', 'all right'] and list(t.columns[:3]) == ['world', 'gsm_hard', 'avg']
    assert t.loc['all right', 'avg'] == 100.0
    assert markdown_table(t).splitlines()[2].startswith('| cot | 75.0 | 50.0 | 62.5 |')

class FakeRetriever:
    def __init__(self): self.queries = []
    def search(self, query, k=3):
        self.queries.append((query, k))
        return [Hit('p1', 'Company 1', 'Company 1 was founded by Person 1.', 1.0)]

def test_cot_rag_puts_passages_in_the_prompt():
    r, lm = FakeRetriever(), cot_lm()
    df = evaluate(CoTMethod(lm, r, k=2), FACTS[1:2], progress=False)
    assert r.queries == [(FACTS[1].question, 2)] and 'founded by Person 1' in _q(lm.requests[0]['messages'])
    assert df.retrieval_calls.tolist() == [1] and df.method.tolist() == ['CoT + RAG']

def retrieve(query: str) -> str:
    "Searches the test corpus."
    return 'Company 1 was founded by Person 1.'

def test_agent_method_counts_and_sag():
    act = lambda code: format_action('Go.', code)
    script = [act('print(retrieve("company 1"))'), act('final_answer("Person 1")')]
    with Sandbox(tools={'retrieve': retrieve}) as sb:
        m = AgentMethod(ScriptedLM(script), lambda: sb, name='agent')
        rec = evaluate(m, FACTS[1:2], progress=False).iloc[0]
        assert (rec.prediction, rec.acc, rec.steps, rec.retrieval_calls, rec.code_errors, rec.parse_failures) == ('Person 1', 1.0, 2, 1, 0, 0)
        assert rec.trajectory['steps'][0]['observation'].startswith('Company 1')
        sag = AgentMethod(ScriptedLM([script[0]] * 3 + ['no code', act('final_answer("Person 1")'), act('1/0')]), lambda: sb, sag=True, n=3)
        rec = evaluate(sag, FACTS[1:2], progress=False).iloc[0]
        assert sag.name == 'agent +SAG' and rec.acc == 1.0 and rec.parse_failures == 0 and rec.code_errors == 0
        assert [c['won'] for c in rec.trajectory['steps'][1]['candidates']] == [False, True, False]

def test_agent_ftp_prefix_comes_from_the_cot_model():
    cot = ScriptedLM(['First find the founder of company 1.\n\nThen answer. <answer>Person 1</answer>'])
    agent_lm = ScriptedLM([' I know it.\n```py\nfinal_answer("Person 1")\n```'])
    with Sandbox() as sb:
        m = AgentMethod(agent_lm, lambda: sb, ftp=True, ftp_lm=cot)
        rec = evaluate(m, FACTS[1:2], progress=False).iloc[0]
    assert m.name == 'agent +FTP' and rec.acc == 1.0
    assert agent_lm.requests[0]['prefix'] == 'Thought: First find the founder of company 1.'
    assert rec.completion_tokens > 0 and rec.trajectory['prefix'] == agent_lm.requests[0]['prefix']

def test_agent_method_sandbox_per_thread_and_close():
    made = []
    def make():
        made.append(Sandbox()); return made[-1]
    lm = ScriptedLM(lambda msgs, prefix, i: '```py\nfinal_answer(%r)\n```' % next(e.answer for e in FACTS if e.question in _q(msgs)))
    m = AgentMethod(lm, make)
    df = evaluate(m, FACTS, workers=2, progress=False)
    assert df.acc.tolist() == [1.0] * 6 and 1 <= len(made) <= 2
    m.close()
    assert m._sandboxes == []
