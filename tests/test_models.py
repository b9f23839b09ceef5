"""Guards for agent_distillation.models: a real llama.cpp OpenAI-compatible server on loopback, per-sequence stop
strings in batched transformers generation, the replay cache, per-thread usage."""
import os, shutil, socket, threading
from pathlib import Path
import pytest
from agent_distillation.models import (CachedLM, LlamaServer, OpenAILM, ScriptedLM, TransformersLM, llama_server_backend,
                                       load_model, load_tokenizer)

COUNT = [{'role': 'user', 'content': 'Count from 1 to 10, separated by commas.'}]
CAPITAL = [{'role': 'user', 'content': 'What is the capital of France?'}]
IDEA = [{'role': 'user', 'content': 'Give me one idea for a weekend project. One sentence.'}]

def _backends():
    "The llama.cpp servers available here: llama-cpp-python's, and a llama-server binary if one is named or on PATH."
    out = []
    if llama_server_backend() == 'python': out.append('python')
    binary = os.environ.get('LLAMA_SERVER') or shutil.which('llama-server')
    if binary: out.append(binary)
    return out or [None]

@pytest.mark.parametrize('binary', _backends())
def test_openai_lm_against_llama_server(binary):
    if binary is None:
        pytest.skip("no llama.cpp server installed: pip install 'llama-cpp-python[server]' (the `serve` extra) "
                    "or set LLAMA_SERVER to a llama-server binary")
    srv = LlamaServer('smollm2-135m-instruct', binary=None if binary == 'python' else binary, n_ctx=2048, ready_timeout=120)
    with srv, OpenAILM(srv.base_url, srv.model, tokenizer='smollm2-135m-instruct', timeout=120) as lm:
        assert srv.host == '127.0.0.1'
        # n > 1 with a seed: n completions, not all equal, and the same again with the same seed
        a = lm.generate([IDEA], n=3, temperature=0.9, max_new_tokens=16, seed=0)[0]
        assert len(a) == 3 and len(set(a)) > 1
        assert lm.generate([IDEA], n=3, temperature=0.9, max_new_tokens=16, seed=0)[0] == a
        assert lm.last_usage['prompt_tokens'] > 0 and lm.last_usage['completion_tokens'] > 0
        # stop strings: cut before the stop, which is not returned; the stopped text starts the unstopped one
        full, cut = (lm.generate([COUNT], max_new_tokens=30, stop=s)[0][0] for s in (None, ['3']))
        assert '3' in full and '3' not in cut and full.startswith(cut) and cut.strip()
        # prefix continuation: only the continuation comes back
        cont = lm.generate([CAPITAL], prefix='Thought: The capital of France is', max_new_tokens=8, stop=['\n'])[0][0]
        assert 'Paris' in cont and not cont.lstrip().startswith('Thought')
        # several conversations in one call, greedy n > 1 repeats one completion
        two = lm.generate([CAPITAL, COUNT], n=2, max_new_tokens=8)
        assert [len(r) for r in two] == [2, 2] and two[0][0] == two[0][1]
        assert len(lm.last_usages) == 2
        port = srv.port
    assert srv.proc is None
    with socket.socket() as s: assert s.connect_ex(('127.0.0.1', port)) != 0   # the server is gone

def test_llama_server_fails_fast_on_a_bad_model(tmp_path):
    if llama_server_backend() is None: pytest.skip("no llama.cpp server installed: pip install 'llama-cpp-python[server]'")
    bad = tmp_path/'bad.gguf'; bad.write_bytes(b'not a gguf')
    with pytest.raises(RuntimeError, match='exited with code'):
        LlamaServer(bad, ready_timeout=60).start()

def test_llama_server_that_dies_says_how(tmp_path):
    "A binary built for another CPU dies of SIGILL at once: the error says so, not 'did not become ready in 120s'."
    fake = tmp_path/'llama-server'; fake.write_text('#!/bin/sh\necho initializing ...\nkill -ILL $$\n'); fake.chmod(0o755)
    gguf = tmp_path/'m.gguf'; gguf.write_bytes(b'')
    with pytest.raises(RuntimeError, match=r'exited with code -4 before it was ready \(illegal instruction') as e:
        LlamaServer(gguf, binary=str(fake), ready_timeout=60).start()
    assert 'initializing' in str(e.value)   # the server's own last words come with it

@pytest.fixture(scope='module')
def tiny():
    import torch
    return TransformersLM(load_model('tiny-random', dtype=torch.float32), load_tokenizer('tiny-random'), max_batch=4)

def test_stop_strings_cut_each_sequence_alone(tiny):
    kw = dict(max_new_tokens=24, temperature=1.0, seed=0)   # seeded: the same random text twice (greedy is all newlines)
    free = tiny.generate([COUNT, CAPITAL], **kw)
    a, b = free[0][0], free[1][0]
    stop = next(a[i:i + 3] for i in range(4, len(a) - 3) if a[i:i + 3].strip() and a[i:i + 3] not in b and a[i:i + 3] not in a[:i + 2])
    cut = tiny.generate([COUNT, CAPITAL], stop=[stop], **kw)
    assert cut[0][0] == a[:a.index(stop)]      # the first row stops where the stop string began
    assert cut[1][0] == b                      # the second runs on as before
    assert tiny.last_usages[0]['completion_tokens'] < tiny.last_usages[1]['completion_tokens']

def test_sampling_is_batched_seeded_and_split(tiny):
    x = tiny.generate([COUNT, CAPITAL], n=5, temperature=1.0, max_new_tokens=6, seed=3)   # 10 rows in batches of 4
    assert [len(r) for r in x] == [5, 5] and len(set(x[0])) > 1
    assert tiny.generate([COUNT, CAPITAL], n=5, temperature=1.0, max_new_tokens=6, seed=3) == x

def test_cache_replays_offline(tmp_path):
    f = tmp_path/'c.jsonl'
    live = CachedLM(ScriptedLM(['one', 'two', 'three']), f)
    assert live.generate([IDEA], n=2, temperature=0.5, seed=7) == [['one', 'two']]
    assert live.generate([IDEA], n=2, temperature=0.5, seed=7) == [['one', 'two']]   # a hit, the script is not consumed
    assert live.generate([CAPITAL]) == [['three']]
    with pytest.raises(KeyError, match="model 'lm'"): CachedLM(None, f, mode='replay').generate([CAPITAL])  # the name is in the key
    rep = CachedLM(None, f, mode='replay', model='scripted')
    assert rep.generate([IDEA], n=2, temperature=0.5, seed=7) == [['one', 'two']]
    assert rep.last_usage == {'prompt_tokens': 10, 'completion_tokens': 2}
    with pytest.raises(KeyError, match='replay miss'): rep.generate([IDEA], n=2, temperature=0.5, seed=8)
    assert len(f.read_text().splitlines()) == 2

def test_last_usage_is_per_thread():
    lm = ScriptedLM(lambda m, p, i: 'word ' * (int(m[0]['content']) + 1))
    seen = {}
    def work(k):
        for _ in range(50):
            lm.generate([[{'role': 'user', 'content': str(k)}]])
            seen.setdefault(k, set()).add(lm.last_usage['completion_tokens'])
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert seen == {k: {k + 1} for k in range(4)}
    assert lm.usage.calls == 200
