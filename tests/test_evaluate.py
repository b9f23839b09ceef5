"""Guards for evaluation: resume after a crash (and a torn last line), records keyed by method, summary arithmetic,
and every method kind driven by a scripted model (CoT, CoT + RAG, agent ± FTP ± SAG with a real sandbox)."""
import json, math
import pandas as pd
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

# ---- batched evaluation (rollouts): same records as one at a time, resumable after a kill
def agent_reply(msgs, prefix, i):
    "Retrieve, then answer right (companies 0-5); company 3 raises once first."
    ex = next(e for e in FACTS if e.question in msgs[1]['content'])
    turns = sum(m['role'] == 'assistant' for m in msgs)
    if turns == 0: return format_action('Look.', f'print(retrieve("{ex.question}"))')
    if turns == 1 and ex.id == 'f3': return format_action('Oops.', '1/0')
    return format_action('Answer.', f'final_answer({ex.answer!r})')

def _no_time(df):
    return [{k: v for k, v in r.items() if k not in ('wall_s', 'trajectory')} | {'messages': r['trajectory']['messages']}
            for r in df.to_dict('records')]

def test_batched_agent_records_equal_one_at_a_time():
    with Sandbox(tools={'retrieve': retrieve}) as s1, Sandbox(tools={'retrieve': retrieve}) as s2, Sandbox(tools={'retrieve': retrieve}) as s3:
        pool = iter([s1, s2, s3])
        one_lm, many_lm = ScriptedLM(agent_reply), ScriptedLM(agent_reply)
        one = evaluate(AgentMethod(one_lm, lambda: s1, batch_size=1), FACTS, progress=False)
        many = evaluate(AgentMethod(many_lm, lambda: next(pool), batch_size=3), FACTS, progress=False)
    assert _no_time(one) == _no_time(many) and many.acc.tolist() == [1.0] * 6
    assert one_lm.usage.calls == len(many_lm.requests) == 13 and many_lm.usage.calls < 13   # 13 turns; several per call

def test_batched_agent_resume_after_kill(tmp_path):
    out = tmp_path/'r.jsonl'
    def killed_after(k):
        return ScriptedLM(lambda m, p, i: agent_reply(m, p, i) if i < k else (_ for _ in ()).throw(KeyboardInterrupt('killed')))
    sbs = [Sandbox(tools={'retrieve': retrieve}) for _ in range(2)]
    try:
        pool = iter(sbs)
        m = AgentMethod(killed_after(7), lambda: next(pool), batch_size=2, name='agent')
        with pytest.raises(KeyboardInterrupt): evaluate(m, FACTS, out=out, progress=False)
        first = [r['id'] for r in read_jsonl(out)]
        assert 0 < len(first) < 6
        lm = ScriptedLM(agent_reply)
        m.lm = lm
        df = evaluate(m, FACTS, out=out, progress=False)
    finally:
        for sb in sbs: sb.close()
    recs = read_jsonl(out)
    assert sorted(r['id'] for r in recs) == [e.id for e in FACTS]                  # nothing lost, nothing twice
    asked = {e.id for e in FACTS for r in lm.requests if e.question in r['messages'][1]['content']}
    assert asked == {e.id for e in FACTS} - set(first)                             # finished ones were not asked again
    assert list(df.id) == [e.id for e in FACTS] and df.acc.tolist() == [1.0] * 6

def test_async_agent_records_equal_one_at_a_time():
    "Asynchronous conversations (the path for a served model): the same records as one at a time, in the given order."
    with Sandbox(tools={'retrieve': retrieve}) as s1, Sandbox(tools={'retrieve': retrieve}) as s2, Sandbox(tools={'retrieve': retrieve}) as s3:
        pool = iter([s2, s3])
        one = evaluate(AgentMethod(ScriptedLM(agent_reply), lambda: s1, batch_size=1), FACTS, progress=False)
        m = AgentMethod(ScriptedLM(agent_reply), lambda: next(pool), batch_size=2, asynchronous=True)
        many = evaluate(m, FACTS, progress=False)
    assert _no_time(one) == _no_time(many) and many.acc.tolist() == [1.0] * 6
    assert m.lm.usage.calls == len(m.lm.requests) == 13                            # one conversation per call, no lockstep

def test_async_agent_resume_after_kill(tmp_path):
    out = tmp_path/'r.jsonl'
    sbs = [Sandbox(tools={'retrieve': retrieve}) for _ in range(2)]
    try:
        pool = iter(sbs)
        dead = ScriptedLM(lambda m, p, i: agent_reply(m, p, i) if i < 7 else (_ for _ in ()).throw(KeyboardInterrupt('killed')))
        m = AgentMethod(dead, lambda: next(pool), batch_size=2, name='agent', asynchronous=True)
        with pytest.raises(KeyboardInterrupt): evaluate(m, FACTS, out=out, progress=False)
        first = [r['id'] for r in read_jsonl(out)]
        assert 0 < len(first) < 6
        m.lm = lm = ScriptedLM(agent_reply)
        df = evaluate(m, FACTS, out=out, progress=False)
    finally:
        for sb in sbs: sb.close()
    recs = read_jsonl(out)
    assert sorted(r['id'] for r in recs) == [e.id for e in FACTS]                  # nothing lost, nothing twice
    asked = {e.id for e in FACTS for r in lm.requests if e.question in r['messages'][1]['content']}
    assert asked == {e.id for e in FACTS} - set(first)                             # finished ones were not asked again
    assert list(df.id) == [e.id for e in FACTS] and df.acc.tolist() == [1.0] * 6

def test_async_wall_time_is_each_questions_share(tmp_path):
    "Records' seconds add up to the run's time (each moment split between the conversations in flight), not batch_size times it."
    import time as _t
    slow = lambda m, p, i: (_t.sleep(0.05), agent_reply(m, p, i))[1]
    with Sandbox(tools={'retrieve': retrieve}) as s1, Sandbox(tools={'retrieve': retrieve}) as s2, Sandbox(tools={'retrieve': retrieve}) as s3:
        pool = iter([s1, s2, s3])
        t0 = _t.time()
        df = evaluate(AgentMethod(ScriptedLM(slow), lambda: next(pool), batch_size=3, asynchronous=True), FACTS, progress=False)
        took = _t.time() - t0
    assert 0.5 * took < df.wall_s.sum() <= took + 0.01

def test_async_error_keeps_finished_answers_and_stops_threads(tmp_path):
    "A conversation that fails: the answers finished before are kept, the error is raised, no thread is left running."
    import threading as _th, time as _t
    out = tmp_path/'r.jsonl'
    def reply(m, p, i):
        if FACTS[4].question in m[1]['content']: _t.sleep(0.3); raise ValueError('server said no')
        return agent_reply(m, p, i)
    with Sandbox(tools={'retrieve': retrieve}) as s1, Sandbox(tools={'retrieve': retrieve}) as s2:
        pool, before = iter([s1, s2]), _th.active_count()
        with pytest.raises(ValueError, match='server said no'):
            evaluate(AgentMethod(ScriptedLM(reply), lambda: next(pool), batch_size=2, asynchronous=True), FACTS, out=out, progress=False)
        after = _th.active_count()
    got = {r['id'] for r in read_jsonl(out)}
    assert {'f0', 'f1', 'f2', 'f3'} <= got and 'f4' not in got                    # finished before the failure: kept
    assert after == before                                                         # every worker thread ended

def test_cot_batches_questions_and_keeps_records():
    one, many = cot_lm(lambda id: id != 'f2'), cot_lm(lambda id: id != 'f2')
    a = evaluate(CoTMethod(one, name='cot', batch_size=1), FACTS + MATHS, progress=False)
    b = evaluate(CoTMethod(many, name='cot', batch_size=4), FACTS + MATHS, progress=False)
    pd.testing.assert_frame_equal(a.drop(columns='wall_s'), b.drop(columns='wall_s'))   # NaN (em of math) equals NaN here
    assert (one.usage.calls, many.usage.calls) == (9, 3)

def test_tiny_model_batched_cached_rollouts_match_one_at_a_time():
    "Under greedy decoding a fixed-weight tiny model gives the same trajectories batched with KV reuse as one at a time."
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from agent_distillation.agent import CodeAgent
    from agent_distillation.models import TransformersLM
    from agent_distillation.registry import load_tokenizer
    from agent_distillation.rollouts import PrefixCacheLM, rollouts
    tok = load_tokenizer('tiny-random')
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    kw = dict(student=True, max_steps=2, max_new_tokens=12)
    qs = [e.question for e in FACTS[:4]]
    sbs = [Sandbox(tools={'retrieve': retrieve}) for _ in range(3)]
    try:
        one = [CodeAgent(TransformersLM(model, tok), sbs[0], **kw).run(q) for q in qs]
        fast = PrefixCacheLM(model, tok)
        many = {t.question: t for t in rollouts(fast, qs, sbs, **kw)}
    finally:
        for sb in sbs: sb.close()
    assert [many[q].messages for q in qs] == [t.messages for t in one]
    assert len({t.steps[0].raw for t in one}) > 1                                   # the text differs by question
    assert 0 < fast.fed_tokens < fast.usage.prompt_tokens / 2                       # most prompt tokens came from the cache
