"""Guard tests for the code sandbox: model-written code is hostile.

Each attack must end as an error result within the sandbox's limits, leak no secret, leave the host untouched (files,
environment, this process, a loopback listener) and leave the sandbox usable. A second set runs the kernel-level attacks
with the Python audit hook switched off, to show that the operating-system layers hold on their own. Benign tests at
the end pin what honest code gets: state, numpy, sympy, tools, final_answer, fork_run and adopt.
"""
import os, signal, socket, secrets, time
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


def test_fork_run_shares_files(sb):
    "Documented limit: candidates fork the interpreter, not the file system, so their scratch writes are shared."
    sb.reset(); sb.run("open('log.txt', 'w').close()")
    sb.fork_run(["open('log.txt', 'a').write('x')"] * 3)
    assert sb.run("open('log.txt').read()").output == "'xxx'\n"


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
    except FileNotFoundError: return True


def test_unadopted_candidates_are_killed(sb):
    rs = sb.fork_run(['1', '2', '3'], keep=True)
    pids = [pid for _, pid in sb._kept.values()]
    sb.adopt(0)
    time.sleep(0.2)
    assert all(gone(pid) for pid in pids[1:]) and not gone(pids[0])


def test_clean_environment(sb):
    r = sb.run(ESC + "print(sorted(os.environ))")
    assert ENV_KEY not in r.output and 'HOME' in r.output, r


def test_close_kills_everything():
    s = Sandbox(timeout=TIMEOUT)
    s.run('x = 1'); s.fork_run(['x'], keep=True)
    pids = [s._pid, s._procs.zygote.pid] + [pid for _, pid in s._kept.values()]
    base = s._procs.base
    s.close()
    time.sleep(0.2)
    assert all(gone(pid) for pid in pids) and not base.exists()
