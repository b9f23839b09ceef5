"""Guard tests for the code sandbox: model-written code is hostile.

Each attack must end as an error result within the sandbox's limits, leak no secret, leave the host untouched (files,
environment, this process, a loopback listener) and leave the sandbox usable. A second set runs the kernel-level attacks
with the Python audit hook switched off, to show that the operating-system layers hold on their own. Benign tests at
the end pin what honest code gets: state, numpy, sympy, tools, final_answer, fork_run and adopt.
"""
import json, os, signal, socket, secrets, subprocess, threading, time
from types import SimpleNamespace
import pytest
from agent_distillation.sandbox import Sandbox, ExecResult, LAYERS

TIMEOUT, MEMORY_MB = 3, 512
ENV_KEY = 'AGENT_SANDBOX_TEST_API_KEY'
# The shortest route from allowed code to the real `os`, `sys` and `__import__` (the import allow-list is no barrier).
ESC = "import random; os = random._os; sys = os.sys; imp = random.__builtins__['__import__']\n"


@pytest.fixture(scope='module')
def host(tmp_path_factory):
    "A host directory with a private key, a world-readable secret, a file to protect, and a secret in the environment."
    d = tmp_path_factory.mktemp('host')
    token = 'SECRET-' + secrets.token_hex(12)
    key = d/'id_rsa'; key.write_text(token); key.chmod(0o600)
    env = d/'.env'; env.write_text(f'API_KEY={token}\n'); env.chmod(0o644)
    victim = d/'victim.txt'; victim.write_text('keep me')
    os.environ[ENV_KEY] = token
    srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(8); srv.settimeout(0.05)
    yield SimpleNamespace(dir=d, token=token, key=key, env=env, victim=victim, srv=srv, port=srv.getsockname()[1],
                          pid=os.getpid())
    srv.close(); os.environ.pop(ENV_KEY, None)


@pytest.fixture(scope='module')
def sb():
    with Sandbox(timeout=TIMEOUT, memory_mb=MEMORY_MB) as s: yield s


@pytest.fixture(scope='module')
def kernel_only():
    "All layers except the audit hook: what the operating system alone enforces."
    with Sandbox(timeout=TIMEOUT, memory_mb=MEMORY_MB, layers=[l for l in LAYERS if l != 'audit_hook']) as s: yield s


def snapshot(host):
    return sorted((p.name, p.read_bytes(), p.stat().st_mode) for p in host.dir.iterdir())


def check_host(host, before, r: ExecResult):
    "No secret in the result, host files as they were, no connection to the listener, this process alive."
    text = f'{r.output}\n{r.error}\n{r.final_answer!r}'
    assert host.token not in text, f'secret leaked: {text[:500]}'
    assert snapshot(host) == before, 'host directory changed'
    with pytest.raises(socket.timeout): host.srv.accept()
    assert os.environ.get(ENV_KEY) == host.token


def attack(s, host, code, limit=TIMEOUT):
    "Run `code` (a template over `host`), check the host and that the sandbox still works; return the result."
    before, t0 = snapshot(host), time.monotonic()
    r = s.run(code.format(h=host))
    took = time.monotonic() - t0
    check_host(host, before, r)
    assert took < limit + 2, f'took {took:.1f}s'
    after = s.run('print(6 * 7)')
    assert after.output == '42\n' and after.error is None, after
    return r


ATTACKS = {
    # secret files, by many routes
    'read_open': "print(open('{h.key}').read())",
    'read_world_readable': "print(open('{h.env}').read())",
    'read_pathlib': ESC + "print(imp('pathlib').Path('{h.env}').read_text())",
    'read_os_open': ESC + "fd = os.open('{h.env}', os.O_RDONLY); print(os.read(fd, 200))",
    'read_linecache': ESC + "line = imp('linecache').getline('{h.env}', 1); print(line); assert line",
    'read_numpy_fromfile': "import numpy as np; print(np.fromfile('{h.env}', dtype='uint8').tobytes())",
    'read_numpy_loadtxt': "import numpy as np; print(np.loadtxt('{h.env}', dtype=str, delimiter='|'))",
    'read_symlink': ESC + "os.symlink('{h.env}', 'link'); print(open('link').read())",
    'read_symlink_pathlib': ESC + "p = imp('pathlib').Path('link2'); p.symlink_to('{h.env}'); print(p.read_text())",
    'read_proc_root': "print(open('/proc/{h.pid}/root{h.env}').read())",
    'read_proc_parent_environ': "print(open('/proc/{h.pid}/environ').read())",
    'read_fileio_subclass': "F = [c for c in object.__subclasses__() if c.__name__ == 'FileIO'][0]; print(F('{h.env}').read())",
    'read_sympify_eval': "import sympy; print(sympy.sympify(\"open('{h.env}').read()\"))",
    'list_host_dir': ESC + "print(os.listdir('{h.dir}'))",
    # environment variables
    'env_os_environ': ESC + "print(dict(os.environ)); assert '" + ENV_KEY + "' in os.environ",
    'env_proc_self': "print(open('/proc/self/environ').read())",
    'env_sympify_getenv': "import sympy; v = sympy.sympify(\"__import__('os').environ['" + ENV_KEY + "']\"); print(v)",
    # writes and deletes outside scratch
    'write_open': "open('{h.dir}/pwned.txt', 'w').write('x')",
    'write_pathlib': ESC + "imp('pathlib').Path('{h.dir}/pwned.txt').write_text('x')",
    'write_numpy_save': "import numpy as np; np.save('{h.dir}/pwned.npy', np.zeros(3))",
    'write_truncate_victim': "open('{h.victim}', 'w').close()",
    'delete_victim': ESC + "os.remove('{h.victim}')",
    'rename_victim': ESC + "os.rename('{h.victim}', 'stolen.txt')",
    'chmod_victim': ESC + "os.chmod('{h.victim}', 0o777)",
    'mkdir_host': ESC + "os.mkdir('{h.dir}/newdir')",
    'move_out_of_scratch': ESC + "open('f.txt', 'w').write('x'); os.rename('f.txt', '{h.dir}/moved.txt')",
    # processes
    'os_system': ESC + "rc = os.system('touch {h.dir}/system'); assert rc == 0, rc",
    'subprocess_run': ESC + "imp('subprocess').run(['touch', '{h.dir}/subprocess'], check=True)",
    'os_popen': ESC + "print(os.popen('touch {h.dir}/popen; echo done').read())",
    'os_execv': ESC + "os.execv('/bin/sh', ['sh', '-c', 'touch {h.dir}/exec'])",
    'posix_spawn': ESC + "os.waitpid(os.posix_spawn('/usr/bin/touch', ['touch', '{h.dir}/spawn'], {{}}), 0)",
    'fork': ESC + "pid = os.fork()\nif pid == 0: os._exit(0)",
    'fork_bomb': ESC + "while True: os.fork()",
    'kill_parent': ESC + "os.kill({h.pid}, 9)",
    'killpg_parent': ESC + "os.killpg(os.getpgid({h.pid}), 9)",
    'kill_parent_ctypes': ESC + "assert sys.modules['ctypes'].CDLL(None).kill({h.pid}, 9) == 0",
    # escapes from the import allow-list
    'import_os': "import os; os.system('touch {h.dir}/pwned')",
    'dunder_import': "__import__('os').system('touch {h.dir}/pwned')",
    'import_ctypes': "import ctypes",
    'importlib_posix': ESC + "imp('importlib').import_module('posix').system('touch {h.dir}/pwned')",
    'sys_modules': ESC + "sys.modules['os'].system('touch {h.dir}/pwned')",
    'subclasses_globals': ("w = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
                           "w.__init__.__globals__['system']('touch {h.dir}/pwned')"),
    'ctypes_libc_system': ESC + "assert sys.modules['ctypes'].CDLL(None).system(b'touch {h.dir}/pwned') == 0",
    'exec_real_builtins': ("import random\nexec(\"import os; os.system('touch {h.dir}/pwned')\", "
                           "{{'__builtins__': random.__builtins__}})"),
    'sympify_system': "import sympy; sympy.sympify(\"__import__('os').system('touch {h.dir}/pwned')\")",
    'new_code_object': "c = (lambda: 0).__code__; type(c)(*[getattr(c, 'co_' + a) for a in ('argcount',)])",
    'remove_audit_hook': ESC + "sys.addaudithook(lambda *a: None); os.system('touch {h.dir}/pwned')",
    'frame_walk': "try: 1/0\nexcept Exception as e: f = e.__traceback__.tb_frame.f_back; print(f.f_globals)",
    # network
    'connect_loopback': ESC + "imp('socket').create_connection(('127.0.0.1', {h.port}), timeout=1)",
    'urllib_loopback': ESC + "imp('urllib.request').urlopen('http://127.0.0.1:{h.port}/', timeout=1)",
    'raw_socket_module': ESC + "s = imp('_socket').socket(2, 1); s.connect(('127.0.0.1', {h.port}))",
    # crashes and channel tampering
    'os_exit': ESC + "os._exit(0)",
    'os_abort': ESC + "os.abort()",
    'forge_protocol': ESC + "for fd in range(3, 64):\n    try: os.write(fd, b'\\x7f\\xff\\xff\\xff garbage')\n    except OSError: pass",
}


@pytest.mark.parametrize('name', list(ATTACKS))
def test_attack(sb, host, name):
    r = attack(sb, host, ATTACKS[name])
    assert r.error, f'{name} did not fail: {r}'


RESOURCE_ATTACKS = {  # name -> (code, what the error must say)
    'infinite_loop': ("while True: pass", 'TimeoutError'),
    'sleep': ("import time; time.sleep(1000)", 'TimeoutError'),
    'ignored_signals': (ESC + "sig = sys.modules['signal']\nfor s in (sig.SIGTERM, sig.SIGINT, sig.SIGALRM, sig.SIGHUP):\n"
                        "    try: sig.signal(s, sig.SIG_IGN)\n    except Exception: pass\nwhile True: pass", 'TimeoutError'),
    'output_flood_forever': ("while True: print('x' * 1000)", 'TimeoutError'),
    'memory_bytearray': ("x = bytearray(8 * 2**30)", 'MemoryError'),
    'memory_growth': ("x = []\nwhile True: x.append(' ' * 10**6)", 'MemoryError'),
    'memory_numpy': ("import numpy as np; a = np.ones(2**31)", 'MemoryError'),
    'disk_big_file': ("f = open('big.bin', 'wb')\nwhile True: f.write(b'x' * 2**20)", 'Errno'),
    'disk_many_files': ("for i in range(10**6): open(f'f{{i}}', 'w').write('x' * 8192)", 'Errno'),
    'recursion': ("def f(n): return f(n + 1)\nf(0)", 'RecursionError'),
    'c_stack_overflow': (ESC + "sys.setrecursionlimit(10**7)\ndef f(n): return list(map(f, [n + 1]))\nf(0)", 'SIGSEGV'),
}


@pytest.mark.parametrize('name', list(RESOURCE_ATTACKS))
def test_resource_attack(sb, host, name):
    code, expected = RESOURCE_ATTACKS[name]
    sb.reset()  # each starts from a fresh worker: a memory attack leaves its list bound in the namespace
    r = attack(sb, host, code)
    assert r.error and expected in r.error, r
    if expected == 'TimeoutError': assert r.timed_out and r.restarted


def test_output_is_capped(sb, host):
    r = attack(sb, host, "for i in range(10**5): print('y' * 100)")
    assert r.error is None and len(r.output) < 10_100 and r.output.endswith('[... truncated 10090000 chars]')


KERNEL_ATTACKS = {  # the same goals with the audit hook off: only the kernel stands in the way
    'read_key': "print(open('{h.key}').read())",
    'read_world_readable': "print(open('{h.env}').read())",
    'read_proc_root': "print(open('/proc/{h.pid}/root{h.env}').read())",
    'read_symlink': ESC + "os.symlink('{h.env}', 'l'); print(open('l').read())",
    'env': ESC + "print(dict(os.environ)); assert '" + ENV_KEY + "' in os.environ",
    'write_host': "open('{h.dir}/pwned.txt', 'w').write('x')",
    'delete_victim': ESC + "os.remove('{h.victim}')",
    'os_system': ESC + "rc = os.system('touch {h.dir}/system'); assert rc == 0, rc",
    'subprocess': ESC + "imp('subprocess').run(['touch', '{h.dir}/subprocess'], check=True)",
    'ctypes_system': ESC + "assert sys.modules['ctypes'].CDLL(None).system(b'touch {h.dir}/pwned') == 0",
    'kill_parent': ESC + "os.kill({h.pid}, 9)",
    'kill_parent_ctypes': ESC + "assert sys.modules['ctypes'].CDLL(None).kill({h.pid}, 9) == 0",
    'connect_loopback': ESC + "imp('socket').create_connection(('127.0.0.1', {h.port}), timeout=1)",
    'become_root': ESC + "os.setuid(0)",
    'unshare': ESC + "assert sys.modules['ctypes'].CDLL(None).unshare(0x10000000) == 0",
    'fork_bomb': ESC + "while True: os.fork()",
    'memory_bomb_in_forks': ESC + "for _ in range(6): os.fork()\nx = bytearray(400 * 2**20)\nimport time; time.sleep(0.5)",
}


@pytest.mark.parametrize('name', list(KERNEL_ATTACKS))
def test_kernel_layers_alone(kernel_only, host, name):
    assert kernel_only.protections['audit_hook'].startswith('off')
    r = attack(kernel_only, host, KERNEL_ATTACKS[name])
    assert r.error, f'{name} did not fail: {r}'


def test_all_layers_active_here(sb):
    "On this project's machines (root, recent kernel) every layer is on; elsewhere this documents what is missing."
    if os.getuid() != 0: pytest.skip('not root: namespaces and dropping root depend on the system')
    off = {k: v for k, v in sb.protections.items() if str(v).startswith('off')}
    assert not off, off


def test_attack_count():
    assert len(ATTACKS) + len(RESOURCE_ATTACKS) + len(KERNEL_ATTACKS) >= 30


# ---- benign behaviour -------------------------------------------------------------------------------------------

def test_state_persists_and_last_expression(sb):
    sb.reset()
    assert sb.run('x = 20\nprint("set")').output == 'set\n'
    r = sb.run('x += 1\nx * 2')
    assert (r.output, r.error, r.is_final, r.restarted) == ('42\n', None, False, False)


def test_numpy_sympy_and_lazy_imports(sb):
    r = sb.run("import numpy as np, sympy as sp\nimport sympy.physics.units as u\n"
               "print(np.linalg.solve([[2, 0], [0, 4]], [2, 8]).tolist())\n"
               "x = sp.symbols('x'); print(sp.solve(x**2 - 4, x)); print(u.meter.name)")
    assert r.error is None and r.output == '[1.0, 2.0]\n[-2, 2]\nmeter\n', r


def test_final_answer_plain_data(sb):
    r = sb.run("import numpy as np, sympy as sp\nprint('before')\nfinal_answer({'n': np.int64(3), 'r': sp.Rational(1, 3)})\nprint('after')")
    assert (r.output, r.is_final, r.final_answer, r.error) == ('before\n', True, {'n': 3, 'r': '1/3'}, None)


def test_tools_run_in_parent(host):
    calls = []
    def retrieve(query: str, k: int = 3):
        "Search the corpus."
        calls.append((query, k)); return [f'{query} #{i}' for i in range(k)] + [os.getpid()]
    def broken(q): raise KeyError(q)
    with Sandbox(tools=[retrieve, broken], timeout=TIMEOUT) as s:
        r = s.run("print(retrieve('paris', k=2))\nprint(retrieve.__doc__)")
        assert r.output == f"['paris #0', 'paris #1', {host.pid}]\nSearch the corpus.\n" and calls == [('paris', 2)]
        r = s.run("broken('x')")
        assert 'tool broken failed: KeyError' in r.error
        slow = s.run("import time\nfor _ in range(3): retrieve('x')\nprint('ok')", timeout=1)
        assert slow.output == 'ok\n'


def test_scratch_files_and_reset(sb):
    sb.reset()
    assert sb.run("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())").output == 'hi\n'
    assert sb.run("print(open('notes.txt').read())").output == 'hi\n'
    sb.reset()
    r = sb.run("y = 1\nopen('notes.txt').read()")
    assert 'FileNotFoundError' in r.error
    assert 'NameError' in sb.run('x').error


def test_fork_run_candidates_write_private_copies(sb):
    "Each candidate appends to its own copy of the scratch files; the worker's file is unchanged."
    sb.reset(); sb.run("open('log.txt', 'w').write('s')")
    rs = sb.fork_run(["open('log.txt', 'a').write('x')\nprint(open('log.txt').read())"] * 3)
    assert [r.output for r in rs] == ['sx\n'] * 3
    assert sb.run("open('log.txt').read()").output == "'s'\n"


def test_restart_after_timeout_is_reported(sb):
    sb.run('z = 1')
    r = sb.run('while True: pass', timeout=0.5)
    assert r.timed_out and r.restarted and 'variables from earlier steps are gone' in r.error
    r = sb.run('z')
    assert 'NameError' in r.error and not r.restarted


def test_fork_run_leaves_state_unchanged(sb):
    sb.reset(); sb.run('counter = 0\nlog = []')
    rs = sb.fork_run(['counter += 1\nlog.append("a")\ncounter', 'counter += 10\ncounter', '1/0', 'while True: pass'],
                     timeout=3)  # generous: on a loaded machine forking 4 candidates can take a while
    assert [r.output for r in rs[:2]] == ['1\n', '10\n']
    assert 'ZeroDivisionError' in rs[2].error and rs[3].timed_out and not rs[3].restarted
    assert sb.run('counter, log').output == '(0, [])\n'


def test_fork_run_tools_and_final_answer():
    with Sandbox(tools={'double': lambda x: 2 * x}, timeout=TIMEOUT) as s:
        rs = s.fork_run([f'final_answer(double({i}))' for i in range(8)])
        assert [r.final_answer for r in rs] == [2 * i for i in range(8)] and all(r.is_final for r in rs)


def test_adopt_commits_the_winner_exactly_once(sb):
    sb.reset(); sb.run("counter = 0\nlog = []")
    code = "counter += {}\nlog.append({})\ncounter"
    rs = sb.fork_run([code.format(i, i) for i in (1, 2, 3)], keep=True)
    assert [r.output for r in rs] == ['1\n', '2\n', '3\n']
    sb.adopt(1)
    assert sb.run("counter, log").output == "(2, [2])\n"
    with pytest.raises(ValueError): sb.adopt(0)
    assert sb.run('counter').output == '2\n'


def gone(pid) -> bool:
    "The process no longer runs (it does not exist, or is a zombie waiting to be reaped)."
    try: return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
    except (FileNotFoundError, ProcessLookupError): return True


def test_unadopted_candidates_are_killed(sb):
    rs = sb.fork_run(['1', '2', '3'], keep=True)
    pids = [c.pid for c in sb._kept.values()]
    sb.adopt(0)
    time.sleep(0.2)
    assert all(gone(pid) for pid in pids[1:]) and not gone(pids[0])


def test_clean_environment(sb):
    r = sb.run(ESC + "print(sorted(os.environ))")
    assert ENV_KEY not in r.output and 'HOME' in r.output, r


def test_close_kills_everything():
    s = Sandbox(timeout=TIMEOUT)
    s.run('x = 1'); s.fork_run(['x'], keep=True)
    pids = [s._pid, s._procs.zygote.pid] + [c.pid for c in s._kept.values()]
    base = s._procs.base
    s.close()
    time.sleep(0.2)
    assert all(gone(pid) for pid in pids) and not base.exists()


# ---- second round: the host side ------------------------------------------------------------------------------------
# The parent must treat everything from the worker as untrusted input. These attacks take the worker over (the audit
# hook is no obstacle, see test_audit_hook_is_a_convenience) and speak to the parent directly on the worker's socket.

# Sandboxed code that finds its socket to the parent and can send it raw framed bytes.
SEND = ESC + ("import json; st = imp('stat'); struct = imp('struct'); time = imp('time')\n"
              "def is_sock(f):\n    try: return st.S_ISSOCK(os.fstat(f).st_mode)\n    except OSError: return False\n"
              "fd = [f for f in range(3, 256) if is_sock(f)][0]\n"
              "def send(b): os.write(fd, struct.pack('!I', len(b)) + b)\n"
              "def sendj(o): send(json.dumps(o).encode())\n")
# Sandboxed code that replaces the worker's `fork` so that the parent gets `reply` (a Python literal) instead.
FORGE_FORK = ESC + ("import json\nw = sys._getframe().f_back.f_back.f_locals['self']\n"
                    "def fake(fds, codes, cpu_s, tag=0):\n    for f in fds: os.close(f)\n"
                    "    m = json.dumps({reply}).encode(); w.sock.sendall(len(m).to_bytes(4, 'big') + m)\n"
                    "w.fork = fake\n")


@pytest.fixture
def victim():
    "A host process that sandboxed code would like the parent to kill."
    p = subprocess.Popen(['sleep', '60'])
    yield p
    p.kill(); p.wait()


@pytest.fixture
def fresh():
    "A sandbox for attacks that damage the worker on purpose (all layers but the audit hook)."
    with Sandbox(timeout=TIMEOUT, memory_mb=MEMORY_MB, layers=[l for l in LAYERS if l != 'audit_hook']) as s: yield s


def usable(s):
    r = s.run('print(6 * 7)')
    return r.output == '42\n' and r.error is None


def sandbox_procs(s, expected: set, wait: float = 2.0) -> set:
    "The live processes of sandbox `s` (zygote aside) once they equal `expected` (killed ones take a moment to exit)."
    end = time.monotonic() + wait
    while (procs := s._procs.members()) != expected and time.monotonic() < end: time.sleep(0.02)
    return procs


# kind 1: the parent acts on data the worker controls

@pytest.mark.parametrize('reply', ["{{'type': 'forked', 'pids': [{v}], 'n': 1, 'error': None}}",
                                   "{{'type': 'forked', 'pids': [{v}, {v}], 'n': 0, 'error': 'x'}}",
                                   "{{'type': 'forked', 'pids': ['{v}'], 'error': None}}"])
def test_forged_fork_pids_are_never_signalled(fresh, victim, reply):
    "The worker reports a host process as its candidate: the parent never takes a pid from the worker."
    assert fresh.run(FORGE_FORK.format(reply=reply.format(v=victim.pid))).error is None
    rs = fresh.fork_run(['1'], keep=True)
    assert rs[0].error and not rs[0].ok
    time.sleep(0.1)
    assert victim.poll() is None, 'the parent killed a host process named by the worker'
    fresh.reset(); assert usable(fresh)


def test_forged_started_pid_is_ignored(sb, victim):
    "A candidate claims a host pid in its messages, then hangs: the timeout kill hits the candidate, not the claim."
    code = SEND + f"sendj({{'type': 'started', 'pid': {victim.pid}, 'pids': [{victim.pid}]}})\nwhile True: pass"
    rs = sb.fork_run([code, '7'], timeout=1)
    assert rs[0].timed_out and rs[1].output == '7\n'
    time.sleep(0.1)
    assert victim.poll() is None and usable(sb)


def test_candidate_pid_comes_from_the_kernel(sb):
    rs = sb.fork_run([ESC + 'print(os.getpid())'], keep=True)
    assert rs[0].error is None and [c.pid for c in sb._kept.values()] == [int(rs[0].output)]


@pytest.mark.parametrize('msg', ['[1, 2, 3]', '"result"', '42', 'null', '{"type": ["result"]}', '{"type": "nonsense"}',
                                 '{"type": "result", "output": 5}', '{"type": "result", "output": "x", "error": [1]}',
                                 '{"type": "forked", "pids": [1]}', '{not json'])
def test_malformed_worker_message_is_an_error_result(sb, msg):
    "Any message that is not a well-formed result ends the run as an error; the sandbox restarts and stays usable."
    r = sb.run(SEND + f"send({msg!r}.encode())\ntime.sleep(30)")
    assert r.error and 'SandboxError' in r.error and r.restarted and not r.timed_out, r
    assert usable(sb)


@pytest.mark.parametrize('call', [{'type': 'tool', 'name': ['retrieve'], 'args': [], 'kwargs': {}},
                                  {'type': 'tool', 'name': {'a': 1}, 'args': [], 'kwargs': {}},
                                  {'type': 'tool', 'name': None},
                                  {'type': 'tool', 'name': 'retrieve', 'args': 'abc', 'kwargs': {}},
                                  {'type': 'tool', 'name': 'retrieve', 'args': [], 'kwargs': ['q']},
                                  {'type': 'tool', 'name': 'retrieve', 'args': [], 'kwargs': {'no such': 1}},
                                  {'type': 'tool', 'name': '__class__', 'args': [], 'kwargs': {}}])
def test_forged_tool_calls_get_an_error_reply(tooled, call):
    "A tool call with a name that is not a known tool's, or arguments of the wrong shape, is answered with an error."
    r = tooled.run(SEND + f"sendj({call!r})\nn = struct.unpack('!I', os.read(fd, 4))[0]\nprint(json.loads(os.read(fd, n))['error'])")
    assert r.error is None and r.output.strip(), r
    assert usable(tooled)


@pytest.mark.parametrize('payload', ["b'[' + b'[],' * 1_000_000 + b'[]]'", "b'{\"type\": \"result\", \"output\": \"' + b'a' * (5 << 20) + b'\"}'"])
def test_amplifying_or_huge_message_is_refused(sb, payload):
    "3 MB of `[],` would decode into about 60 MB of lists; a 5 MB message exceeds the limit: both end as errors."
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = sb.run(SEND + f"send({payload})\ntime.sleep(30)")
    assert r.error and 'SandboxError' in r.error and r.restarted, r
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: nothing huge was decoded
    assert usable(sb)


def test_length_header_of_4_gb(sb):
    r = sb.run(SEND + "os.write(fd, b'\\xff\\xff\\xff\\xff' + b'x' * 100)\ntime.sleep(30)")
    assert 'exceeds the limit' in r.error and usable(sb)


# kind 2: deadlines that data could stretch

def test_trickled_message_times_out(sb):
    "A result trickled one byte every 50 ms never completes: the run still ends at its one deadline."
    code = SEND + "os.write(fd, struct.pack('!I', 10_000))\nwhile True: os.write(fd, b' '); time.sleep(0.05)"
    t0 = time.monotonic(); r = sb.run(code, timeout=1)
    assert r.timed_out and time.monotonic() - t0 < 2.5, r
    assert usable(sb)


def test_trickling_candidate_delays_nobody(sb):
    code = SEND + "os.write(fd, struct.pack('!I', 10_000))\nwhile True: os.write(fd, b' '); time.sleep(0.05)"
    t0 = time.monotonic(); rs = sb.fork_run([code, 'final_answer(5)'], timeout=1)
    assert rs[0].timed_out and rs[1].final_answer == 5 and time.monotonic() - t0 < 2.5, rs


def slow_tool(x=0):
    "A tool that takes 50 ms."
    time.sleep(0.05); return x


@pytest.mark.parametrize('max_tool_time,bound', [(None, 2), (0.25, 0.75)])
def test_tool_call_loop_is_bounded(max_tool_time, bound):
    "Tool time extends a run's deadline only up to `max_tool_time` (default 3 x timeout), not once per call."
    with Sandbox(tools=[slow_tool], timeout=0.5, max_tool_time=max_tool_time) as s:
        s.run('1')
        t0 = time.monotonic(); r = s.run('while True: slow_tool()')
        took = time.monotonic() - t0
        assert r.timed_out and took < bound + 1, took
        t0 = time.monotonic(); rs = s.fork_run(['while True: slow_tool(1)', 'while True: slow_tool(2)'], share_tools=False)
        assert all(x.timed_out for x in rs) and time.monotonic() - t0 < bound + 1.5
        assert usable(s)


def test_slow_tools_still_do_not_eat_the_code_time():
    with Sandbox(tools=[slow_tool], timeout=1) as s:
        r = s.run('for _ in range(30): slow_tool()\nprint("done")')  # 1.5 s of tools in a 1 s run
        assert r.output == 'done\n' and not r.timed_out, r


# kind 3: exceptions that must not escape run / fork_run

def test_worker_dies_during_a_tool_call():
    "The parent answers a tool call to a dead worker (BrokenPipeError inside): an error result, not an exception."
    with Sandbox(tools=[slow_tool], timeout=TIMEOUT) as s:
        r = s.run(SEND + "sendj({'type': 'tool', 'name': 'slow_tool', 'args': [], 'kwargs': {}})\nos._exit(0)")
        assert r.error and 'SandboxError' in r.error and r.restarted, r
        r = s.fork_run([SEND + "sendj({'type': 'tool', 'name': 'slow_tool', 'args': [], 'kwargs': {}})\nos._exit(0)", '3'])
        assert r[0].error and r[1].output == '3\n', r
        assert usable(s)


def test_candidates_that_vanish(sb):
    "Candidates that exit, crash or time out (ProcessLookupError territory) give error results; adopt refuses them."
    rs = sb.fork_run([ESC + 'os._exit(0)', ESC + 'os.abort()', 'while True: pass', '1'], keep=True, timeout=1)
    assert all(r.error for r in rs[:3]) and rs[3].output == '1\n', rs
    for i in range(3):
        with pytest.raises(ValueError): sb.adopt(i)
    sb.adopt(3); assert usable(sb)


@pytest.mark.parametrize('reply', ["[1]", "{'type': 'forked', 'n': 'x'}", "{'type': 'forked', 'n': 10**6}",
                                   "{'type': 'forked', 'n': None, 'error': {'a': 1}}", "{'type': 'forked', 'n': True}"])
def test_malformed_fork_reply(fresh, reply):
    assert fresh.run(FORGE_FORK.format(reply=reply)).error is None
    rs = fresh.fork_run(['1', '2'])
    assert len(rs) == 2 and all(r.error for r in rs), rs
    assert usable(fresh)


# kind 4: results that would break what comes after

def test_huge_integer_final_answer_keeps_the_worker(sb):
    sb.reset(); sb.run('keep = 5')
    r = sb.run('final_answer(10**100000)')  # the worker used to die turning it into JSON
    assert r.is_final and r.error is None and 'digits' in r.final_answer and not r.restarted, r
    r = sb.run('final_answer([10**5000, -(10**5000), 2**64])')
    assert r.final_answer[2] == 2**64 and 'digits' in r.final_answer[1]
    assert 'ValueError' in sb.run('print(10**100000)').error
    assert sb.run('keep').output == '5\n'


@pytest.mark.parametrize('code', ["raise ValueError('x' * 30_000_000)", "assert False, 'y' * 30_000_000",
                                  "{}['k' * 30_000_000]", "def f():\n    raise RuntimeError('z' * 30_000_000)\nf()"])
def test_huge_error_text_is_capped(sb, code):
    r = sb.run(code)
    assert r.error and len(r.error) < 6_000 and not r.restarted, len(r.error or '')


def test_huge_final_answer_is_capped(sb):
    r = sb.run("final_answer('z' * 5_000_000)")
    assert r.is_final and len(r.final_answer) < 101_000 and not r.restarted
    r = sb.run("a = []\nfor _ in range(100): a = [a]\nfinal_answer(a)")
    assert r.is_final and len(repr(r.final_answer)) < 10_000


# The worker echoes each request's nonce in its result; code that reads it from the worker's frames can still forge one.
NONCE = ESC + "f = sys._getframe()\nwhile 'nonce' not in f.f_locals: f = f.f_back\nnonce = f.f_locals['nonce']\n"
FORGED_SURROGATES = ("sendj({'type': 'result', 'nonce': nonce, 'output': '\\ud800', 'error': '\\udc00', "
                     "'final_answer': {'\\ud800': '\\udfff'}, 'is_final': True})")


@pytest.mark.parametrize('code', ["print('lone \\ud800 surrogate')", "raise ValueError('\\udfff')",
                                  "final_answer({'\\udc00k': ['\\ud83d', 'ok']})", "print(chr(0xdc00))",
                                  NONCE + SEND + FORGED_SURROGATES])
def test_results_are_valid_utf8(sb, code):
    "Lone surrogates would crash the next HTTP request or the JSONL writer: every string in a result encodes as UTF-8."
    r = sb.run(code)
    for text in (r.output, r.error or '', json.dumps(r.final_answer, ensure_ascii=False)): text.encode('utf-8')
    assert '\ufffd' in r.output + (r.error or '') + json.dumps(r.final_answer, ensure_ascii=False), r


def test_tool_arguments_are_valid_utf8_and_bounded():
    got = []
    with Sandbox(tools={'echo': lambda q: got.append(q) or q}, timeout=TIMEOUT) as s:
        r = s.run("echo('a\\ud800b')")
        assert got == ['a\ufffdb'] and r.output == "'a\ufffdb'\n", (got, r)
        r = s.run("echo('x' * 2_000_000)")
        assert 'ValueError' in r.error and 'over' in r.error and not r.restarted and len(got) == 1


# kind 5: fork candidates are independent

def test_candidate_files_are_private(sb):
    sb.reset()
    rs = sb.fork_run(["open('shared.txt', 'w').write('A')\nprint('wrote')",
                      "import time; time.sleep(0.5); print(open('shared.txt').read())"])
    assert rs[0].output == 'wrote\n' and 'FileNotFoundError' in rs[1].error, rs
    assert 'FileNotFoundError' in sb.run("open('shared.txt').read()").error


def test_candidate_cannot_reach_sibling_or_worker_files(fresh):
    "With the audit hook off, Landlock alone keeps a candidate inside its own copy of scratch."
    fresh.run(f"open('base.txt', 'w').write('b')")
    scratch = str(fresh.scratch)
    rs = fresh.fork_run([ESC + f"open('{scratch}/base.txt', 'a').write('x')",
                         ESC + "print(os.listdir('..'))",
                         ESC + f"print([d for d in os.listdir('{scratch}')])",
                         ESC + "print(open('base.txt').read())"])
    assert all('PermissionError' in (r.error or '') for r in rs[:3]), rs
    assert rs[3].output == 'b\n'
    assert fresh.run("print(open('base.txt').read())").output == 'b\n'


def scratch_entries(s) -> list:
    "The names in the worker's scratch directory, read by the parent through /proc (the worker's own mount view)."
    return sorted(os.listdir(f'/proc/{s._pid}/root{s.scratch}'))


def test_candidate_copies_are_removed(sb):
    sb.reset(); sb.run("open('mine.txt', 'w').write('m')")
    sb.fork_run(["open('c.txt', 'w').write('c')"] * 3)
    assert scratch_entries(sb) == ['mine.txt']
    assert 'FileNotFoundError' in sb.run("open('c.txt').read()").error
    rs = sb.fork_run(["open('w.txt', 'w').write('0')", "open('w.txt', 'w').write('1')"], keep=True)
    sb.adopt(1)
    assert sb.run("print(open('w.txt').read() + open('mine.txt').read())").output == '1m\n'
    tree = [(os.path.relpath(d, f'/proc/{sb._pid}/root{sb.scratch}'), sorted(fs))
            for d, _, fs in os.walk(f'/proc/{sb._pid}/root{sb.scratch}')]
    assert len(tree) == 2 and tree[1][1] == ['mine.txt', 'w.txt'] and tree[0][1] == [], tree  # only the winner's copy is left


@pytest.mark.parametrize('how', ["p = os.getppid()\nfor q in range(p - 3, p + 30):\n    if q != os.getpid():\n"
                                 "        try: os.kill(q, 9)\n        except OSError: pass",
                                 "os.kill(-1, 9)", "os.killpg(0, 9)", "sys.modules['ctypes'].CDLL(None).kill(os.getppid(), 9)",
                                 "os.kill(os.getppid(), 19)"])
def test_candidate_cannot_signal_siblings_or_worker(fresh, how):
    "One candidate tries to decide the vote by killing (or stopping) the others and the worker: the kernel refuses."
    fresh.run('x = 1')
    rs = fresh.fork_run([ESC + how, 'import time; time.sleep(0.5); x + 1', 'import time; time.sleep(0.5); x + 2'], timeout=TIMEOUT)
    assert rs[1].output == '2\n' and rs[2].output == '3\n', rs
    r = fresh.run('x')
    assert r.output == '1\n' and not r.restarted


FORK_SLEEPER = ESC + "pid = os.fork()\nif pid == 0:\n    while True: pass\nprint(pid)"
FORK_ORPHAN = ESC + ("r, w = os.pipe()\nif os.fork() == 0:\n    g = os.fork()\n    if g: os.write(w, str(g).encode()); os._exit(0)\n"
                     "    while True: pass\nprint(int(os.read(r, 20)))")  # the grandchild outlives its parent


def gone_soon(pid, wait=1.0) -> bool:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if gone(pid): return True
        time.sleep(0.02)
    return gone(pid)


@pytest.mark.parametrize('code', [FORK_SLEEPER, FORK_ORPHAN])
def test_processes_started_by_a_run_end_with_it(fresh, code):
    r = fresh.run(code)
    assert r.error is None, r
    assert gone_soon(int(r.output)) and sandbox_procs(fresh, {fresh._pid}) == {fresh._pid}
    assert usable(fresh)


@pytest.mark.parametrize('keep', [False, True])
def test_processes_started_by_candidates_end_with_fork_run(fresh, keep):
    rs = fresh.fork_run([FORK_SLEEPER, FORK_ORPHAN, '1'], keep=keep)
    assert rs[0].error is None and rs[1].error is None, rs
    for r in rs[:2]: assert gone_soon(int(r.output))
    kept = {fresh._pid, *(c.pid for c in fresh._kept.values())}
    assert sandbox_procs(fresh, kept) == kept
    if keep: fresh.adopt(2); assert sandbox_procs(fresh, {fresh._pid}) == {fresh._pid}


def test_background_processes_die_without_a_cgroup():
    "Where there is no cgroup, the parent finds the sandbox's processes as the zygote's descendants in /proc."
    with Sandbox(timeout=TIMEOUT, layers=[l for l in LAYERS if l not in ('cgroup', 'audit_hook')]) as s:
        assert s.protections['cgroup'].startswith('off')
        r = s.run(FORK_SLEEPER)
        assert gone_soon(int(r.output)) and sandbox_procs(s, {s._pid}) == {s._pid}
        rs = s.fork_run([FORK_SLEEPER, '2'], keep=True)
        kept = {s._pid, *(c.pid for c in s._kept.values())}
        assert gone_soon(int(rs[0].output)) and sandbox_procs(s, kept) == kept


# kind 6: the audit hook is a convenience

def test_audit_hook_is_a_convenience(sb, host):
    "Model code can switch the hook off; the kernel layers still refuse, and the protections say what the hook is."
    assert 'not a boundary' in sb.protections['audit_hook']
    off = ESC + "sys.modules['agent_distillation.sandbox']._Guard.__call__ = lambda *a: None\n"  # one route of many
    assert 'PermissionError' in sb.run(ESC + "imp('mmap')").error and sb.run(off + "imp('mmap')").error is None
    r = sb.run(ESC + f"print(open('{host.env}').read())")
    assert r.error and host.token not in r.output + r.error
    sb.reset()


# the agent's tools stay callable (issue 14, kind 2) and final_answer ends the step (kind 7)

@pytest.fixture(scope='module')
def tooled():
    with Sandbox(tools={'retrieve': lambda q: [f'passage about {q}']}, timeout=TIMEOUT) as s: yield s


@pytest.mark.parametrize('code', ['final_answer = "Paris"', 'retrieve = retrieve("x")', 'del final_answer',
                                  'def final_answer(x): return x', 'import math as retrieve', 'for retrieve in range(3): pass',
                                  '(final_answer := 1)', 'class retrieve: pass', 'try: 1/0\nexcept Exception as final_answer: pass',
                                  'from math import pi as final_answer', 'x = 1\nif x:\n    retrieve, y = 1, 2',
                                  'exec("final_answer = 1")', 'exec(compile("del retrieve", "s", "exec"))'])
def test_tool_names_cannot_be_rebound(tooled, code):
    r = tooled.run(code)
    assert r.error and 'cannot be reassigned' in r.error and not r.restarted, r
    assert tooled.run('print(retrieve("y"))').output == "['passage about y']\n"
    r = tooled.run('final_answer("Paris")')
    assert r.is_final and r.final_answer == 'Paris'


@pytest.mark.parametrize('code', ["globals()['final_answer'] = 'Paris'", "globals()['retrieve'] = None",
                                  "__builtins__['final_answer'] = None", "__builtins__['retrieve'] = len",
                                  "__builtins__.clear()", "globals()['__builtins__'] = {}"])
def test_tool_names_are_restored_before_each_step(tooled, code):
    "Rebinding that reading the code cannot see is undone before the next step."
    tooled.run(code)
    assert tooled.run('print(retrieve("y"))').output == "['passage about y']\n"
    r = tooled.run('final_answer("Paris")')
    assert r.is_final and r.final_answer == 'Paris'
    tooled.run('def f(): return retrieve("z")')  # functions defined earlier see the restored tools too
    tooled.run("__builtins__['retrieve'] = len")
    assert tooled.run('f()').output == "['passage about z']\n"


@pytest.mark.parametrize('code', ["try:\n    final_answer(1)\nexcept Exception:\n    pass\nprint('after')",
                                  "try:\n    final_answer(1)\nexcept BaseException:\n    pass\nprint('after')",
                                  "try:\n    final_answer(1)\nexcept:\n    print('swallowed')\nprint('after')",
                                  "try:\n    final_answer(1)\nexcept BaseException as e:\n    print(repr(e))\nfinal_answer(2)",
                                  "for i in range(3):\n    try:\n        final_answer(1 + i)\n    except BaseException:\n        continue",
                                  "def f():\n    try:\n        final_answer(1)\n    except:\n        return 0\nf()\nprint('after')",
                                  "try:\n    final_answer(1)\nexcept* BaseException:\n    pass\nprint('after')",
                                  "try:\n    try:\n        final_answer(1)\n    finally:\n        print('cleanup')\nexcept BaseException:\n    pass\nprint('after')",
                                  # red-team round: exec'd source, context managers and finally blocks that swallow it
                                  'exec("try:\\n    final_answer(1)\\nexcept BaseException:\\n    pass")\nprint("after")',
                                  'eval(compile("try:\\n    final_answer(1)\\nexcept BaseException: pass", "s", "exec"))\nprint("after")',
                                  "class Quiet:\n    def __enter__(self): return self\n    def __exit__(self, *a): return True\n"
                                  "with Quiet():\n    final_answer(1)\nprint('after')",
                                  "for i in range(2):\n    try:\n        final_answer(1 + i)\n    finally:\n        continue\nprint('after')",
                                  "def f():\n    try:\n        final_answer(1)\n    finally:\n        return 0\nf()\nprint('after')"])
def test_final_answer_ends_the_code_under_broad_handlers(tooled, code):
    r = tooled.run(code)
    assert r.is_final and r.final_answer == 1 and r.error is None, r
    assert 'after' not in r.output and 'swallowed' not in r.output and 'FinalAnswer' not in r.output, r


def test_final_answer_inside_a_candidate_handler(tooled):
    rs = tooled.fork_run(["try:\n    final_answer(retrieve('a'))\nexcept BaseException:\n    final_answer('swallowed')"] * 2)
    assert [r.final_answer for r in rs] == [['passage about a']] * 2



# ---- third round: an independent red team (one test per finding) ---------------------------------------------------

SIGIO = ESC + ("fcntl = sys.modules['fcntl']\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, os.getpid())\n"
               "fcntl.fcntl(r, 10, {sig})\nfcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)\n"
               "os.write(w, b'x')\nimport time; time.sleep(0.5)\nprint('alive')")  # 10 = F_SETSIG


def test_signal_driven_io_is_refused(sb):
    "fcntl(F_SETOWN, F_SETSIG, O_ASYNC) would let code signal itself or others without kill(2): seccomp refuses it."
    r = sb.run(SIGIO.format(sig=40))
    assert r.error and 'PermissionError' in r.error and not r.restarted, r
    assert usable(sb) and sb.fork_run(['1'])[0].output == '1\n'


def test_worker_killed_by_an_unnamed_signal_keeps_the_sandbox():
    "Without seccomp the worker can die of real-time signal 40, which has no name: the zygote must survive that."
    with Sandbox(timeout=TIMEOUT, layers=[l for l in LAYERS if l not in ('seccomp', 'audit_hook')]) as s:
        s.run('x = 1')
        for _ in range(2):
            r = s.run(SIGIO.format(sig=40))
            assert r.restarted and 'signal 40' in r.error, r
        assert usable(s) and s.fork_run(['2'])[0].output == '2\n'
        s.reset(); assert usable(s)


def thaw(s):
    "Let the sandbox's processes run (they are frozen between requests, and a frozen process dies only once thawed)."
    if hasattr(s._procs.cgroup, 'freeze'): s._procs.cgroup.freeze(False)


def test_zygote_death_is_survived(sb):
    "If the zygote dies, its worker dies with it (PR_SET_PDEATHSIG, set after the uid change) and a new zygote takes over."
    sb.run('x = 1'); worker = sb._pid
    z = sb._procs.zygote; os.kill(z.pid, signal.SIGKILL); z.wait(); thaw(sb)
    assert gone_soon(worker), 'the worker outlived its zygote'
    r = sb.run('print(2)')
    assert r.output == '2\n' and r.restarted, r
    sb.reset(); assert usable(sb) and sb.fork_run(['3'])[0].output == '3\n'


def processes_of(base) -> set:
    "Live processes whose command line names sandbox directory `base` (the zygote and everything forked from it)."
    out = set()
    for p in filter(str.isdigit, os.listdir('/proc')):
        try:
            if base.name in open(f'/proc/{p}/cmdline').read() and not gone(int(p)): out.add(int(p))
        except OSError: pass
    return out


def test_nothing_outlives_close_when_the_zygote_dies_mid_run():
    "Without a cgroup the parent finds the sandbox's processes by session: a dead zygote hides none of them."
    s = Sandbox(timeout=TIMEOUT, layers=[l for l in LAYERS if l not in ('cgroup', 'audit_hook')])
    s.run('1'); z = s._procs.zygote
    threading.Timer(0.5, os.kill, (z.pid, signal.SIGKILL)).start()
    s.run(ESC + "import time\nif os.fork() == 0:\n    time.sleep(20)\n    os._exit(0)\ntime.sleep(1.5)")
    s.close()
    end = time.monotonic() + 2
    while (left := processes_of(s._procs.base)) and time.monotonic() < end: time.sleep(0.05)
    for p in left: os.kill(p, signal.SIGKILL)  # do not leave them to the machine when this fails
    assert not left, left


def test_large_code_keeps_the_worker(sb):
    "Code larger than the socket buffer used to find the parent's socket non-blocking and kill the worker."
    sb.reset(); sb.run('keep = 42')
    r = sb.run(f"s = '{'a' * 400_000}'\nprint(len(s), keep)")
    assert r.output == '400000 42\n' and not r.restarted, r
    rs = sb.fork_run([f"s = '{'b' * 60_000}'\nprint(len(s), keep)"] * 8)
    assert [x.output for x in rs] == ['60000 42\n'] * 8, rs
    assert sb.run('keep').output == '42\n'


def test_tools_do_not_hand_out_the_worker(tooled):
    "`final_answer` and the tool stubs hold no reference to the worker (its guard, socket and builtins)."
    r = tooled.run("final_answer.__self__")
    assert 'AttributeError' in r.error, r
    r = tooled.run("print(sorted({type(c.cell_contents).__name__ for f in (final_answer, retrieve) for c in f.__closure__ or ()}))")
    assert r.error is None and 'Worker' not in r.output and 'Guard' not in r.output, r


def test_forged_results_do_not_shift_later_steps(sb):
    "Results written ahead on the worker's socket carry no nonce of a request: refused, and later steps stay in line."
    forged = SEND + ("sendj({'type': 'result', 'output': 'forged\\n', 'error': None, 'is_final': False, 'final_answer': None})\n"
                     "sendj({'type': 'result', 'output': '', 'error': None, 'is_final': True, 'final_answer': 'Lyon'})\n")
    r = sb.run(forged + "print('real')")
    assert r.output != 'forged\n' and not r.is_final, r
    r = sb.run("final_answer('Paris')")
    assert r.final_answer == 'Paris', r
    assert sb.run('print(3)').output == '3\n' and sb.run('print(4)').output == '4\n'


PLANT = ESC + "signal = sys.modules['signal']\n{how}"


@pytest.mark.parametrize('how', ["signal.signal(signal.SIGALRM, lambda s, f: final_answer('HIJACKED'))\n"
                                 "signal.setitimer(signal.ITIMER_REAL, 0.2, 0.1)",
                                 "signal.signal(signal.SIGALRM, lambda s, f: final_answer('HIJACKED'))\nsignal.alarm(1)",
                                 "try: signal.signal(signal.SIGALRM, lambda s, f: final_answer('HIJACKED'))\n"
                                 "except OSError: pass\nsignal.setitimer(signal.ITIMER_REAL, 0.2, 0.1)",
                                 "signal.signal(signal.SIGCHLD, lambda s, f: final_answer('HIJACKED'))"])
def test_earlier_steps_cannot_plant_timers_or_handlers(sb, how):
    "No signal handler and no timer: nothing of an earlier step runs by itself while a later step runs."
    r = sb.run(PLANT.format(how=how))
    assert r.error and 'Operation not permitted' in r.error, r
    r = sb.run("import time\nt = time.time()\nwhile time.time() - t < 1.2: pass\nprint('done')")
    assert r.output == 'done\n' and not r.is_final and r.error is None, r


@pytest.mark.parametrize('how', ["threading = sys.modules['threading']\nthreading.Thread(target=time.sleep, args=(5,)).start()",
                                 "sys.modules['_thread'].start_new_thread(time.sleep, (5,))"])
def test_threads_are_refused(sb, how):
    "A thread left by one step could act during the next step or forge the vote: seccomp refuses thread creation."
    r = sb.run(ESC + "import time\n" + how)
    assert r.error and "can't start new thread" in r.error and not r.restarted, r
    rs = sb.fork_run([f'final_answer("real {i}")' for i in range(4)])
    assert [x.final_answer for x in rs] == [f'real {i}' for i in range(4)], rs


FORGE_CANDIDATES = ESC + ("import json\nw = sys._getframe().f_back.f_back.f_locals['self']\nreal = w.fork\n"
                          "m = json.dumps({'type': 'result', 'output': '', 'error': None, 'is_final': True, 'final_answer': 'FORGED'}).encode()\n"
                          "def fake(fds, *args):\n    for f in fds: os.write(f, len(m).to_bytes(4, 'big') + m)\n    return real(fds, *args)\n"
                          "w.fork = fake\n")


def test_worker_cannot_answer_for_its_candidates(fresh):
    "The kernel names who sent a candidate's first message: the worker itself (or a stranger) is refused."
    assert fresh.run(FORGE_CANDIDATES).error is None
    rs = fresh.fork_run(['final_answer("real 0")', 'final_answer("real 1")'], keep=True)
    assert all('FORGED' not in str(r.final_answer) for r in rs), rs
    for i in range(2):
        with pytest.raises(ValueError): fresh.adopt(i)
    fresh.reset(); assert usable(fresh)


SIBLING_PROBE = ESC + ("import time\ntag, i = os.path.basename(os.getcwd()).split('-')[1:]\n"
                       "sib = os.path.join('..', f'.fork-{tag}-{1 - int(i)}')\nend = time.time() + 2\n"
                       "while not os.path.isdir(sib) and time.time() < end: time.sleep(0.01)\n"
                       "try: open(os.path.join(sib, 'planted'), 'w').write('x'); print('WROTE')\nexcept OSError: print('denied')")


def test_sibling_isolation_past_the_landlock_layer_limit(fresh):
    "Each adopted candidate adds a Landlock layer and the kernel stops at 16: then fork_run fails closed, never open."
    seen = []
    for step in range(18):
        rs = fresh.fork_run([SIBLING_PROBE, SIBLING_PROBE], keep=True)
        seen += [r.output or r.error for r in rs]
        assert not any('WROTE' in (r.output or '') for r in rs), (step, rs)
        if rs[0].error:
            assert 'Landlock' in rs[0].error and 'reset()' in rs[0].error, rs
            break
        fresh.adopt(0)
    assert any('Landlock' in x for x in seen), 'the layer limit was never reached'
    fresh.reset(); assert fresh.fork_run([SIBLING_PROBE, SIBLING_PROBE])[0].output == 'denied\n'


def test_full_scratch_gives_a_clear_fork_error():
    "Candidates copy the scratch files: on disks of their own each gets a copy; sharing scratch, when N copies cannot fit, fork_run says so (disk_mb, N), without host paths."
    with Sandbox(timeout=TIMEOUT, disk_mb=16) as s:
        s.run("open('big', 'wb').write(b'x' * (10 << 20))\nkeep = 1")
        rs = s.fork_run(["final_answer(len(open('big', 'rb').read()))"] * 2)
        if getattr(s, '_zslots', False): assert [r.final_answer for r in rs] == [10 << 20] * 2, rs
        else:
            assert all(r.error and 'disk_mb=16' in r.error and '2 copies' in r.error for r in rs), rs
            assert all(str(s.scratch) not in r.error for r in rs)
        r = s.run('keep')
        assert r.output == '1\n' and not r.restarted


def test_no_free_file_descriptors_gives_a_clear_fork_error(sb):
    sb.reset()
    r = sb.run("fs = []\ntry:\n    while True: fs.append(open('/dev/null'))\nexcept OSError: pass\nprint(len(fs) > 200)")
    assert r.output == 'True\n', r
    rs = sb.fork_run(['1', '2'])
    assert all(x.error and 'file descriptors' in x.error for x in rs), rs
    r = sb.run("del fs\nprint('fine')")
    assert r.output == 'fine\n' and not r.restarted, r


def test_honest_code_needs_no_thread_timer_or_handler(sb):
    "What the seccomp rules refuse is nothing honest code needs: every allowed import, numpy's linear algebra, sympy."
    from agent_distillation.sandbox import ALLOWED_IMPORTS
    code = (f"import {', '.join(ALLOWED_IMPORTS)}\nimport numpy as np, sympy as sp\n"
            "a = np.linalg.inv(np.array([[2., 1.], [1., 3.]])) @ np.array([[2., 1.], [1., 3.]])\n"
            "x = sp.symbols('x')\nq = queue.Queue(); q.put(1)\ntime.sleep(0.01)\n"
            "print(np.allclose(a, np.eye(2)), sp.solve(x**2 - 4, x), sp.simplify(sp.sin(x)**2 + sp.cos(x)**2), q.get(),\n"
            "      fractions.Fraction(1, 3) + decimal.Decimal(1).is_finite(), statistics.median([3, 1, 2]))")
    r = sb.run(code)
    assert r.error is None and r.output == 'True [-2, 2] 1 1 4/3 2\n', r


def test_audit_hook_flags_are_reset_each_step(sb):
    "A step that switches the guard off through its flags (reached via frames) does not leave it off for the next step."
    r = sb.run(ESC + "sys._getframe().f_back.f_back.f_locals['self'].guard.busy = True\nos.kill(os.getpid(), 0)")
    assert 'blocked by the sandbox' not in r.error, r   # the kernel refused it (seccomp), not the hook
    r = sb.run(ESC + "os.kill(os.getpid(), 0)")
    assert 'blocked by the sandbox: os.kill' in r.error, r
    sb.reset()


# Third round (second red team): the episode boundary, IPC, a host crash, sibling disks and tools, code after run

NOTE_DEEP = ESC + ("home = os.open('.', os.O_RDONLY)\nos.mkdir('k'); os.chdir('k')\nfor i in range({depth}): os.mkdir('a'); os.chdir('a')\n"
                   "open('note.txt', 'w').write('episode 1 says 1234')\nos.fchdir(home); os.close(home)\nprint('planted')")
FIND_NOTE = ESC + "p = 'k'\nwhile os.path.isdir(p + '/a'): p += '/a'\nprint(os.path.exists(p + '/note.txt'), os.listdir('.'))"


@pytest.mark.parametrize('layers', ['all', 'no_mountns'])
def test_reset_forgets_deep_trees(layers):
    "A 300-deep directory (more levels than the worker has file descriptors) is gone after reset(), with or without a scratch disk to replace."
    keep = [l for l in LAYERS if l != 'audit_hook' and (layers == 'all' or l != 'mountns')]
    with Sandbox(timeout=20, layers=keep) as s:
        assert s.run(NOTE_DEEP.format(depth=300)).output == 'planted\n'
        s.reset()
        r = s.run(FIND_NOTE)
        assert r.output == 'False []\n', r
        if layers == 'all':
            st = s.run(ESC + "st = os.statvfs('.'); print(st.f_bfree == st.f_blocks, st.f_ffree + 1 == st.f_files)")
            assert st.output == 'True True\n', st


def test_deep_tree_gives_a_clear_fork_error_and_keeps_the_worker(fresh):
    "Directories nested past the copy limit make fork_run say so; the worker and its variables stay; reset() clears it."
    r = fresh.run("keep = 7\n" + NOTE_DEEP.format(depth=1010))
    assert r.output == 'planted\n', r
    rs = fresh.fork_run(['final_answer(1)', 'final_answer(2)'])
    assert all(x.error and 'nested deeper' in x.error and 'reset()' in x.error for x in rs), rs
    assert all(str(fresh.scratch) not in x.error for x in rs)
    r = fresh.run('keep')
    assert r.output == '7\n' and not r.restarted, r
    fresh.reset()
    assert [x.final_answer for x in fresh.fork_run(['final_answer(1)', 'final_answer(2)'])] == [1, 2]


def test_pipes_in_scratch_do_not_break_fork_run(sb):
    sb.reset()
    assert sb.run(ESC + "os.mkfifo('pipe')\nprint(os.listdir('.'))").output == "['pipe']\n"
    rs = sb.fork_run(['final_answer(1)', "import random\nfinal_answer(random._os.listdir('.'))"])
    assert [r.final_answer for r in rs] == [1, []] and not any(r.error for r in rs), rs
    sb.reset()


def test_working_directory_is_restored_each_step(sb):
    sb.reset()
    home = sb.run(ESC + 'print(os.getcwd())').output
    r = sb.run(ESC + "os.chdir('/usr')\nprint(os.getcwd())")
    assert r.output == '/usr\n', r
    assert sb.run(ESC + 'print(os.getcwd())').output == home
    r = sb.run("open('notes.txt', 'w').write('x')")
    assert r.error is None, r


@pytest.mark.parametrize('nr,args', [(29, '0x1234, 4096, 0o1000 | 0o600'), (64, '0x1234, 1, 0o1000 | 0o600'),
                                     (68, '0x1234, 0o1000 | 0o600'), (240, "b'/q', 0o100 | 2, 0o600, None")],
                         ids=['shmget', 'semget', 'msgget', 'mq_open'])
def test_ipc_is_refused(fresh, nr, args):
    "SysV shared memory, semaphores and message queues and POSIX queues: no object that outlives a step, a worker or an episode."
    r = fresh.run(ESC + f"ct = imp('ctypes')\nlibc = ct.CDLL(None, use_errno=True)\n"
                        f"print(libc.syscall({nr}, {args}), ct.get_errno())")
    assert r.output == '-1 1\n', r   # EPERM


def test_shared_memory_does_not_cross_episodes():
    "With seccomp off, the IPC namespace alone keeps a SysV segment of one episode from the next (two layers, not one)."
    get = ESC + "ct = imp('ctypes')\nlibc = ct.CDLL(None, use_errno=True)\nprint(libc.syscall(29, 0x1234, {}) >= 0)"
    with Sandbox(timeout=TIMEOUT, layers=[l for l in LAYERS if l not in ('seccomp', 'audit_hook')]) as s:
        assert s.run(get.format('4096, 0o1000 | 0o600')).output == 'True\n'
        assert s.run(get.format('0, 0')).output == 'True\n'   # the same worker sees its segment
        s.reset()
        r = s.run(get.format('0, 0'))
        assert r.output == 'False\n', r


CRASHED_HOST = '''
from agent_distillation.sandbox import Sandbox
s = Sandbox(timeout=60)
s.fork_run(['x = 1'], keep=True); s.adopt(0)
print(s._pid, s._procs.zygote.pid, flush=True)
s.run('import time\\ntime.sleep(30)')
'''


def test_nothing_outlives_a_host_crash_after_adopt():
    "The adopted worker is a former candidate: killed with the zygote when the host dies mid-step, not left to init."
    p = subprocess.Popen([os.sys.executable, '-c', CRASHED_HOST], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    try:
        assert len(pids) == 2
        time.sleep(1); p.kill(); p.wait()
        end = time.monotonic() + 5
        while not all(gone(q) for q in pids) and time.monotonic() < end: time.sleep(0.05)
        assert all(gone(q) for q in pids), [(q, gone(q)) for q in pids]
    finally:
        for q in pids:
            try: os.kill(q, signal.SIGKILL)
            except OSError: pass


def test_adopted_worker_dies_with_the_zygote():
    with Sandbox(timeout=TIMEOUT) as s:
        s.fork_run(['x = 1'], keep=True); s.adopt(0)
        pid = s._pid
        s._procs.zygote.kill(); thaw(s)
        end = time.monotonic() + 3
        while not gone(pid) and time.monotonic() < end: time.sleep(0.02)
        try: assert gone(pid)
        finally:
            if not gone(pid): os.kill(pid, signal.SIGKILL)
        assert s.run('print(2)').output == '2\n'


def test_candidates_have_disks_of_their_own():
    "One candidate that fills its disk (bytes, then files) takes nothing from its siblings, who write and answer."
    hog = ("f = open('big', 'wb')\ntry:\n    while True: f.write(b'z' * (1 << 20)); f.flush()\nexcept OSError: pass\n"
           "n = 0\ntry:\n    while True: open(f'h{n}', 'w').close(); n += 1\nexcept OSError: pass\n"
           "import time\ntime.sleep(1.5)\nfinal_answer('HOG')")
    honest = ("import time\ntime.sleep(1)\nopen('mine.txt', 'w').write('y' * (1 << 20))\n"
              "for i in range(10): open(f'm{i}', 'w').close()\nfinal_answer(open('notes.txt').read())")
    with Sandbox(timeout=8, disk_mb=8, max_files=64) as s:
        s.run("open('notes.txt', 'w').write('n')")
        rs = s.fork_run([hog, honest, honest])
        assert [r.final_answer for r in rs] == ['HOG', 'n', 'n'], rs
        rs = s.fork_run([honest, honest])   # the hog's disk went with it
        assert [r.final_answer for r in rs] == ['n', 'n'], rs


def test_one_slow_tool_call_times_out_no_sibling():
    "Tools are served one at a time: a candidate's long call must not use up its siblings' time."
    def retrieve(query: str) -> list:
        "Takes 10 us per character of the query (as a term-by-term retriever grows with the query)."
        time.sleep(min(len(query) * 1e-5, 5)); return [query[:5]]
    with Sandbox(tools=[retrieve], timeout=2) as s:
        hog = "retrieve('x' * 250_000)\nfinal_answer('HOG')"
        honest = "import time\ntime.sleep(0.3)\nfinal_answer(retrieve('Paris')[0])"
        rs = s.fork_run([hog, honest, honest], share_tools=False)
        assert [r.final_answer for r in rs] == ['HOG', 'Paris', 'Paris'], rs


def test_cpu_time_has_a_hard_limit(sb):
    r = sb.run(ESC + "res = imp('resource')\nprint(res.getrlimit(res.RLIMIT_CPU)[1] != res.RLIM_INFINITY)")
    assert r.output == 'True\n', r


ANSWER_THEN_SPIN = ESC + ("f = sys._getframe()\nwhile not {'self', 'nonce'} <= f.f_locals.keys(): f = f.f_back\n"
                          "w = f.f_locals['self']; g = type(w).serve.__globals__\n"
                          "g['_send'](w.sock, {'type': 'result', 'nonce': f.f_locals['nonce'], 'output': 'early\\n', 'error': None, "
                          "'is_final': False, 'final_answer': None})\n"
                          "res = g['resource']; res.setrlimit(res.RLIMIT_CPU, (res.getrlimit(res.RLIMIT_CPU)[1],) * 2)\nwhile True: pass")


def cpu_seconds(pid) -> float:
    st = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf('SC_CLK_TCK')


def test_code_burns_no_cpu_after_run_returns(fresh):
    "A step that answers for itself and keeps running is stopped between requests (frozen): no CPU is spent after run returns."
    r = fresh.run(ANSWER_THEN_SPIN)
    assert r.output == 'early\n', r   # what remains possible: a step can end its own run (see the notebook)
    pid, c0 = fresh._pid, cpu_seconds(fresh._pid)
    time.sleep(2)
    assert cpu_seconds(pid) - c0 < 0.05, cpu_seconds(pid) - c0
    r = fresh.run('print(1)')
    assert r.restarted and usable(fresh), r   # the spinning worker never takes the next request: replaced


def test_final_answers_are_strict_json(sb):
    r = sb.run("final_answer({'x': float('nan'), 'y': [float('inf'), -float('inf')]})")
    assert json.loads(json.dumps(r.final_answer, allow_nan=False)) == {'x': 'nan', 'y': ['inf', '-inf']}, r
