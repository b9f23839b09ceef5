"""Guards for scoring: the one correctness rule `is_correct` (mentions of the gold are wrong), answer extraction up to
the sentence end, `math_equal` off the main thread (helper processes, time limits, a stuck helper killed and
replaced), the main thread's SIGALRM bookkeeping, and the LLM judge's control flow with a replayed judge."""
import os, signal, time
from concurrent.futures import ThreadPoolExecutor
import pytest
from agent_distillation import scoring
from agent_distillation.core import Example
from agent_distillation.scoring import extract_answer, llm_judge, math_equal, parse_verdict, score

PAIRS = [  # (prediction, gold, expected): numbers, LaTeX, Python-printed, prose, and one hopeless comparison
    ('13,138,980', 13138980.0, True), ('5031.98', 5031.9785714286, True), ('5031', 5031.9785714286, False),
    (r'(3, \frac{\pi}{2})', r'\left( 3, \frac{\pi}{2} \right)', True), ('(3, pi/2)', r'\left( 3, \frac{\pi}{2} \right)', True),
    (r'(-\infty, -8) \cup (8, \infty)', r'(-\infty,-8]\cup [8,\infty)', False), ('4.6667', r'\frac{14}{3}', False),
    ('x**2 + 7*x + 10', 'x^2+7x+10', True), ('x**2 + 7*x + 10', '10', False), ('C', r'\text{(C)}', True),
    ('So we get $x = 5$ at the end', '5', True), (r'10^{10^{10}}', '2', False),
]

def _in_thread(f, *args, **kw):
    with ThreadPoolExecutor(1) as pool: return pool.submit(f, *args, **kw).result()

def _close_idle_helpers():
    with scoring._helpers_lock:
        helpers = scoring._idle_helpers[:]; scoring._idle_helpers.clear()
    for h in helpers: h.close()

@pytest.fixture(autouse=True)
def no_helpers_left():
    _close_idle_helpers(); yield; _close_idle_helpers()

def test_threads_agree_with_main_thread():
    "Verdicts computed in helper processes (worker threads) equal those computed in the main thread."
    main = [math_equal(p, g, timeout=2.0) for p, g, _ in PAIRS]
    with ThreadPoolExecutor(3) as pool: threaded = list(pool.map(lambda x: math_equal(x[0], x[1], timeout=2.0), PAIRS))
    assert main == threaded == [want for *_, want in PAIRS]
    assert 1 <= len(scoring._idle_helpers) <= 3                  # pooled, at most one per concurrent thread

def test_plain_numbers_need_no_helper():
    assert _in_thread(math_equal, '13,138,980', 13138980.0) is True
    assert _in_thread(math_equal, '033', '33') is True
    assert scoring._idle_helpers == []

def test_time_limit_in_a_thread():
    _in_thread(math_equal, '1/2', r'\frac{1}{2}')                # start the helper outside the timing
    t0 = time.monotonic()
    assert _in_thread(math_equal, r'10^{10^{10}}', '2', timeout=1.0) is False
    assert time.monotonic() - t0 < 4.0                            # 1 s limit (+1 s grace at most) and slack for a busy CPU
    assert _in_thread(math_equal, '1/2', r'\frac{1}{2}') is True  # the same helper goes on answering

def test_stuck_helper_is_killed_and_replaced():
    "A helper that stops answering (SymPy stuck in C code looks like this) is killed; the next call gets a fresh one."
    assert _in_thread(math_equal, '1/2', r'\frac{1}{2}') is True
    [stuck] = scoring._idle_helpers
    os.kill(stuck.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert _in_thread(math_equal, '1/2', r'\frac{1}{2}', timeout=0.5) is False
        assert time.monotonic() - t0 < 4.0                        # 0.5 s limit + 1 s grace
        assert stuck.proc.poll() is not None and stuck not in scoring._idle_helpers
    finally:
        if stuck.proc.poll() is None: os.kill(stuck.proc.pid, signal.SIGCONT)
    assert _in_thread(math_equal, '1/2', r'\frac{1}{2}') is True
    [fresh] = scoring._idle_helpers
    assert fresh is not stuck and fresh.proc.poll() is None

def test_main_thread_time_limit_and_callers_alarm():
    "In the main thread the limit holds, and a SIGALRM handler and timer the caller had set survive the call."
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        t0 = time.monotonic()
        assert math_equal(r'10^{10^{10}}', '2', timeout=0.5) is False
        assert time.monotonic() - t0 < 3.0
        assert math_equal('(x+2)(x+5)', 'x^2+7x+10') is True
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0 and fired == []
        assert signal.getsignal(signal.SIGALRM) is not old and not isinstance(signal.getsignal(signal.SIGALRM), int)
        signal.setitimer(signal.ITIMER_REAL, 0.05); time.sleep(0.3)
        assert fired == [1]                                       # the caller's handler is the one installed again
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)

class ReplayLM:
    "Returns recorded judge replies in order; records every call."
    def __init__(self, replies): self.replies, self.calls = list(replies), []
    def generate(self, messages_list, n=1, temperature=0.0, max_new_tokens=256, stop=None, **kw):
        self.calls.append(dict(messages_list=messages_list, n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop))
        return [[self.replies.pop(0) for _ in range(n)] for _ in messages_list]

def test_llm_judge_control_flow():
    lm = ReplayLM(['**Yes**, same person.', 'No.', 'I am not sure what you mean.', '<think>maybe no</think> yes'])
    q, gold = 'Who was the first president of the United States?', ['George Washington', 'Washington']
    got = [llm_judge(q, p, gold, lm) for p in ['the  Washington', 'G. Washington', 'John Adams', 'Adams?', 'Pres. Washington', None, '  ']]
    assert got == [True, True, False, False, True, False, False]
    assert len(lm.calls) == 4 and lm.replies == []                 # exact match and empty answers never reach the judge
    call = lm.calls[0]
    assert (call['n'], call['temperature'], call['stop']) == (1, 0.0, None)
    [msgs] = call['messages_list']
    assert [m['role'] for m in msgs] == ['system', 'user']
    assert 'George Washington; Washington' in msgs[1]['content'] and 'G. Washington' in msgs[1]['content']

def test_parse_verdict_edge_cases():
    assert parse_verdict('NOT equivalent') is False and parse_verdict('Not the same answer') is False
    assert parse_verdict('True') is True and parse_verdict('nope') is None and parse_verdict(None) is None
    assert parse_verdict('<think>yes yes</think>') is None        # only thinking, no verdict after it

def test_score_end_to_end_from_cot():
    fact = Example('q1', 'Which city hosted the 1900 Olympics?', 'Paris', 'fact', 'hotpotqa')
    gsm = Example('q2', 'How many apples?', 13138980.0, 'math', 'gsm_hard')
    math500 = Example('q3', 'Convert to polar.', r'\left( 3, \frac{\pi}{2} \right)', 'math', 'math500')
    assert score(extract_answer('It was in France.\n<answer>Paris, France</answer>', 'fact'), fact) == {'em': 0.0, 'f1': pytest.approx(2/3), 'acc': 1.0}
    assert score('Paris, France', fact, lm=ReplayLM(['Yes']))['judge'] == 1.0
    assert score(extract_answer(r'2 \times 218983 \times 30 = \boxed{13{,}138{,}980}', 'math'), gsm) == {'acc': 1.0}
    assert score(extract_answer(r'r = 3, so the point is $\boxed{(3, \frac{\pi}{2})}$.', 'math'), math500) == {'acc': 1.0}
    assert _in_thread(score, '(3, pi/2)', math500) == {'acc': 1.0}

# The one correctness rule (filter, evaluation and tables): answers that merely mention the gold are wrong.
MENTIONS = [('no, not yes', 'yes'), ('not Paris but Lyon', 'Paris'), ('Lyon, Marseille, Paris', 'Paris'), ('1911 or 1912', '1912'),
            ('Paris or Lyon', 'Paris'), ('Lyon, Paris', 'Paris'), ('Paris, Lyon', 'Paris'), ('either yes or no', 'yes'),
            ('yes, no', 'yes'), ('1912, 1913', '1912'), ('Breneal Pictures, Moro Records', 'Breneal Pictures'),
            ('Paris (or Lyon)', 'Paris'), ('1912 BC', '1912'), ('Paris, France, or Lyon', 'Paris'), ('Germany, France', 'France'),
            ('not Lyon, France', 'France'), ('Lyon, Paris', 'Lyon')]
QUALIFIED = [('Paris', 'Paris'), ('paris.', 'Paris'), ('Paris, France', 'Paris'), ('Loranby, Argentina', 'Loranby'),
             ('Corartorfield, Scotland', 'Corartorfield'), ('Springfield (Illinois)', 'Springfield'), ('23 years', '23'),
             ('1912.0', '1912'), ('1,912', '1912'), ('The Beatles', 'Beatles'), ('Lyon', ['Paris', 'Lyon']),
             ('Dorirgarburg, Scotland', 'Scotland'), ('Stockholm, Sweden', 'Sweden')]

@pytest.mark.parametrize('pred,gold', MENTIONS)
def test_is_correct_rejects_mentions(pred, gold):
    assert scoring.is_correct(pred, gold, 'fact') is False

@pytest.mark.parametrize('pred,gold', QUALIFIED)
def test_is_correct_accepts_the_gold_with_a_place_or_unit(pred, gold):
    assert scoring.is_correct(pred, gold, 'fact') is True

def test_score_acc_is_is_correct():
    "`score`'s acc is the same rule the teacher's filter uses; EM, F1 and the judge are extra columns."
    fact = Example('q', 'Which city?', 'Paris', 'fact', 'hotpotqa')
    for pred, gold in MENTIONS[:4] + QUALIFIED[:4]:
        ex = Example('q', 'q?', gold, 'fact', 'hotpotqa')
        assert score(pred, ex)['acc'] == float(scoring.is_correct(pred, gold, 'fact'))
    assert score('Lyon, Marseille, Paris', fact, lm=ReplayLM(['Yes']))['acc'] == 0.0   # a lenient judge is a column, not the rule
    assert scoring.is_correct(r'\dfrac{1}{2}', '0.5', 'math') and not scoring.is_correct('0.49', '0.5', 'math')

@pytest.mark.parametrize('text,want', [
    ('Final Answer: The final answer is Paris. I hope it is correct.', 'Paris'),
    ('The answer is Paris. It is the capital of France.', 'Paris'),
    ('The answer is 3.14. That is pi.', '3.14'), ('Answer: 1,200.', '1,200'), ('the answer is: 2.5e3! ok', '2.5e3'),
    ('The answer is Dr. No. A film.', 'Dr. No'), ('Answer: J. R. R. Tolkien. He wrote it.', 'J. R. R. Tolkien'),
    ('I think the answer is yes? Maybe.', 'yes'), ('The answer is Paris\nand more text', 'Paris'),
    ('Answer is Lyon. No wait, the final answer is Paris.', 'Paris')])
def test_extract_answer_stops_at_the_sentence_end(text, want):
    assert extract_answer(text) == want
