"""Guards for agent_distillation.models: a real llama.cpp OpenAI-compatible server on loopback (no second BOS on
/completions), a real misbehaving HTTP server (bounded retries of 200s without completions), per-sequence stop
strings in batched transformers generation, the replay cache, per-thread usage."""
import os, shutil, socket, threading, time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest
from agent_distillation.models import (CachedLM, LlamaServer, OpenAILM, ScriptedLM, ServerError, TransformersLM, llama_server_backend,
                                       load_model, load_tokenizer, render_prompt)

COUNT = [{'role': 'user', 'content': 'Count from 1 to 10, separated by commas.'}]
CAPITAL = [{'role': 'user', 'content': 'What is the capital of France?'}]
IDEA = [{'role': 'user', 'content': 'Give me one idea for a weekend project. One sentence.'}]
NO_SERVER = ("no llama.cpp server here: `make test` builds one (`make llama-server`) and sets LLAMA_SERVER; outside make, "
             "set LLAMA_SERVER to a llama-server binary, or pip install 'llama-cpp-python[server]'")

def _backends():
    "The llama.cpp server here: a llama-server binary ($LLAMA_SERVER or on PATH), else llama-cpp-python's ('python'), else None."
    return [llama_server_backend()]

def _binary():
    "The llama-server binary for tests that need the real one, else skip with the reason."
    binary = os.environ.get('LLAMA_SERVER') or shutil.which('llama-server')
    if not binary: pytest.skip(NO_SERVER)
    return binary

@pytest.mark.parametrize('binary', _backends())
def test_openai_lm_against_llama_server(binary):
    "The OpenAI client against a real server: sampling, seeds, stop strings, prefix continuation, batches of conversations."
    if binary is None: pytest.skip(NO_SERVER)
    srv = LlamaServer('smollm2-135m-instruct', binary=None if binary == 'python' else binary, n_ctx=2048, ready_timeout=120)
    tok = load_tokenizer('smollm2-135m-instruct')
    fresh = dict(cache_prompt=False)   # llama.cpp: no prompt-cache reuse, so repeated requests compute the same numbers
    with srv, OpenAILM(srv.base_url, srv.model, tokenizer=tok, timeout=120) as lm:
        assert srv.host == '127.0.0.1'
        # n > 1 with a seed: n completions, not all equal, and the same again with the same seed
        a = lm.generate([IDEA], n=3, temperature=0.9, max_new_tokens=16, seed=0, **fresh)[0]
        assert len(a) == 3 and all(isinstance(t, str) for t in a) and len(set(a)) > 1
        assert lm.generate([IDEA], n=3, temperature=0.9, max_new_tokens=16, seed=0, **fresh)[0] == a
        assert lm.last_usage['prompt_tokens'] > 0 and lm.last_usage['completion_tokens'] > 0
        # stop strings: a stop taken from the model's own greedy text; the stopped text is that text cut before it
        full = lm.generate([COUNT], max_new_tokens=30, **fresh)[0][0]
        assert full.strip(), 'the server returned no text'
        stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].strip())
        cut = lm.generate([COUNT], max_new_tokens=30, stop=[stop], **fresh)[0][0]
        assert stop not in cut and cut == full[:full.index(stop)]
        # prefix continuation: the prompt is the template plus the prefix as token ids; only the continuation comes back
        prefix = 'Thought: The capital of France is'
        cont = lm.generate([CAPITAL], prefix=prefix, max_new_tokens=8, stop=['\n'])[0][0]
        assert isinstance(cont, str) and '\n' not in cont and not cont.lstrip().startswith(prefix)
        if binary != 'python':
            assert lm.last_usage['prompt_tokens'] == len(tok(render_prompt(tok, CAPITAL, prefix), add_special_tokens=False).input_ids)
        # several conversations in one call (concurrent requests): each as when asked alone; greedy n > 1 repeats one
        two = lm.generate([COUNT, IDEA], n=2, max_new_tokens=30, **fresh)
        assert [len(r) for r in two] == [2, 2] and two[0] == [full, full] and two[1][0] == two[1][1]
        assert len(lm.last_usages) == 2
        port = srv.port
    assert srv.proc is None
    with socket.socket() as s: assert s.connect_ex(('127.0.0.1', port)) != 0   # the server is gone

def test_completion_prompt_gets_no_second_bos():
    "A server that adds BOS to a text prompt doubles the template's own; the token-id prompt OpenAILM sends does not."
    srv = LlamaServer('smollm2-135m-instruct', binary=_binary(), n_ctx=1024, args=['--override-kv', 'tokenizer.ggml.add_bos_token=bool:true'])
    tok = load_tokenizer('smollm2-135m-instruct')
    ids = tok(render_prompt(tok, CAPITAL, 'Thought:'), add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id                                  # SmolLM2's template starts with its BOS, <|im_start|>
    with srv, OpenAILM(srv.base_url, srv.model, tokenizer=tok, prompt_ids=False) as as_text, \
              OpenAILM(srv.base_url, srv.model, tokenizer=tok) as as_ids:
        as_text.generate([CAPITAL], prefix='Thought:', max_new_tokens=2)
        assert as_text.last_usage['prompt_tokens'] == len(ids) + 1     # the fault this guards against: BOS twice
        as_ids.generate([CAPITAL], prefix='Thought:', max_new_tokens=2)
        assert as_ids.last_usage['prompt_tokens'] == len(ids)

def test_llama_server_fails_fast_on_a_bad_model(tmp_path):
    if llama_server_backend() is None: pytest.skip(NO_SERVER)
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

# A real HTTP server on loopback that answers 200 with bodies that hold no completion.
@contextmanager
def _misbehaving_server(bodies):
    "Serve `bodies` in turn (the last one repeats) to every POST; yields (base url, arrival times of the requests)."
    seen, bodies = [], list(bodies)
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_POST(self):
            self.rfile.read(int(self.headers.get('Content-Length', 0)))
            seen.append(time.monotonic())
            body = bodies[min(len(seen), len(bodies)) - 1]
            cut = body.startswith('CUT:')
            data = body.removeprefix('CUT:').encode()
            self.send_response(200); self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data) * (2 if cut else 1))); self.end_headers()
            self.wfile.write(data)
            if cut: self.close_connection = True       # the body ends before its announced length: a cut connection
    srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try: yield f'http://127.0.0.1:{srv.server_address[1]}/v1', seen
    finally: srv.shutdown(); srv.server_close()

OK = '{"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}'
UNUSABLE = [('{"choices": []}', 'no choices'), ('{}', 'no choices'), ('{"choices": null}', 'no choices'),
            ('{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}', 'text is null or missing'),
            ('{"choices": [{"index": 0, "finish_reason": "content_filter"}]}', 'text is null or missing'),
            ('{"choices": [{"index": 0, "message": {"role": "assista', 'not valid JSON'), ('[1, 2]', 'no choices'),
            ('CUT:{"choices": [{"index": 0, "message": {"content": "Par', 'RemoteProtocolError')]

@pytest.mark.parametrize('body,why', UNUSABLE, ids=[w + str(i) for i, (_, w) in enumerate(UNUSABLE)])
def test_unusable_200_is_retried_with_backoff_then_named(body, why):
    with _misbehaving_server([body]) as (url, seen), OpenAILM(url, 'm', max_retries=3, backoff=0.05, timeout=5) as lm:
        with pytest.raises(ServerError, match=why) as e: lm.generate([CAPITAL], n=3, temperature=0.5)
    assert 'gave up after 4 attempts' in str(e.value) and len(seen) == 4       # bounded: 1 try + 3 retries, then a clear error
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2                 # the pause doubles

def test_server_that_recovers_or_ignores_n():
    "Two unusable answers then a good one: the good one is used; a server that returns one choice for n=3 is asked 3 times."
    with _misbehaving_server(['{"choices": []}', 'CUT:{"cho', OK]) as (url, seen), OpenAILM(url, 'm', max_retries=2, backoff=0.01) as lm:
        assert lm.generate([CAPITAL]) == [['Paris']] and len(seen) == 3
        assert lm.generate([CAPITAL], n=3, temperature=0.7, seed=1) == [['Paris'] * 3] and len(seen) == 6

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
