"""Guards for self-consistent action generation: forks leave the state alone, the vote's rules, and the winner's side
effects applied exactly once through `self_consistent_action` and the agent's SAG policy (scripted model, real sandbox)."""
import pytest
from agent_distillation.agent import CodeAgent
from agent_distillation.models import ScriptedLM
from agent_distillation.prompts import format_action
from agent_distillation.sandbox import ExecResult, Sandbox
from agent_distillation.voting import SelfConsistentAction, self_consistent_action, vote

MSGS = [{'role': 'user', 'content': 'q'}]
act = lambda code: format_action('Try.', code)
final = lambda v: ExecResult(final_answer=v, is_final=True)

@pytest.fixture(scope='module')
def sb():
    with Sandbox() as s: yield s

def test_fork_run_leaves_state_unchanged(sb):
    sb.reset(); sb.run('x = 1\nitems = [1]')
    rs = sb.fork_run(['x = 2\nitems.append(2)', 'del x', 'x += 40\nprint(x)'], keep=True)
    assert rs[2].output.strip() == '41'
    assert sb.run('print(x, items)').output.strip() == '1 [1]'

def test_majority_over_final_answers():
    assert vote([final('Lyon'), final('Paris'), final(' paris'), final('Lyon.'), final('PARIS')]) == 1
    assert vote([final(42), ExecResult(error='ValueError'), final(41), final(42.0)]) == 0
    # all final answers print nothing: grouping by output alone would make them one group
    assert vote([final('a'), final('b'), final('b')]) == 1

def test_failures_never_win_unless_all_failed():
    assert vote([None, ExecResult(error='E'), ExecResult('x'), ExecResult(error='E'), None]) == 2
    assert vote([None, ExecResult(error='NameError'), ExecResult(error='NameError', timed_out=True)]) == 0
    assert vote([None, None]) == 0

def test_ties_break_by_first_occurrence():
    assert vote([ExecResult('b'), ExecResult('a'), ExecResult('a'), ExecResult('b')]) == 0
    assert vote([None, ExecResult('a'), ExecResult('b')]) == 1

def test_counter_runs_once(sb):
    sb.reset(); sb.run('counter = 0')
    lm = ScriptedLM([act('counter += 1\nprint(counter)')] * 8)
    win, cands = self_consistent_action(lm, MSGS, sb, n=8)
    assert (win, len(cands), [c.result.output.strip() for c in cands]) == (0, 8, ['1'] * 8)
    assert len(lm.requests) == 1 and lm.requests[0]['n'] == 8          # one batched sampling call
    assert sb.run('print(counter)').output.strip() == '1'

def test_winner_state_is_adopted(sb):
    sb.reset(); sb.run('log = []')
    lm = ScriptedLM([act('log.append("a")\nprint(len(log), "a")'), 'no code here', act('log.append("b")\nprint(len(log), "b")'),
                     act('log.append("b")\nprint(len(log), "b")'), act('1/0')])
    win, cands = self_consistent_action(lm, MSGS, sb, n=5)
    assert win == 2 and [c.won for c in cands] == [False, False, True, False, False]
    assert sb.run('print(log)').output.strip() == "['b']"

def test_all_failed_keeps_first_candidates_partial_state(sb):
    sb.reset(); sb.run('v = 0')
    win, _ = self_consistent_action(ScriptedLM([act('v = 1\nboom()'), act('v = 2\n1/0')]), MSGS, sb, n=2)
    assert win == 0 and sb.run('print(v)').output.strip() == '1'     # as Sandbox.run would have left it
    win, _ = self_consistent_action(ScriptedLM(['nothing', 'to run']), MSGS, sb, n=2)
    assert win == 0 and sb.run('print(v)').output.strip() == '1'

def test_agent_with_sag_increments_once_per_step(sb):
    script = [act('counter = globals().get("counter", 0) + 1\nprint(counter)')] * 4 + [act('final_answer(counter)')] * 4
    agent = CodeAgent(ScriptedLM(script), sb, policy=SelfConsistentAction(n=4))
    t = agent.run('count')
    assert t.final_answer == 1 and len(t.steps) == 2
    assert [len(s.candidates) for s in t.steps] == [4, 4]

def test_sag_policy_in_batched_rollouts_runs_each_winner_once():
    "The SAG policy in lockstep: every conversation's candidates vote in its own sandbox; side effects once per step."
    from agent_distillation.rollouts import rollouts
    script = lambda msgs, prefix, i: (act('counter = globals().get("counter", 0) + 1\nprint(counter)') if len(msgs) == 2
                                      else act('final_answer(counter)'))
    lm, sbs = ScriptedLM(script), [Sandbox(), Sandbox()]
    try: trajs = list(rollouts(lm, ['a', 'b', 'c'], sbs, policy=SelfConsistentAction(n=4)))
    finally:
        for s in sbs: s.close()
    assert [t.final_answer for t in trajs] == [1, 1, 1] and all(len(s.candidates) == 4 for t in trajs for s in t.steps)
    assert {r['n'] for r in lm.requests} == {4} and lm.usage.calls < len(lm.requests)   # samples of several conversations per call
