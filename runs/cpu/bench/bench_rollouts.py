"""Side-by-side rollout benchmark (issue 19): the same questions one at a time (`CodeAgent.run` + `TransformersLM`, the
path before batching), batched in this process (`rollouts` + `PrefixCacheLM`), and batched over llama.cpp's slots
(`StudentServer`: base GGUF + LoRA GGUF), per student and policy; questions per hour and their ratios, tokens run per
question, how many final answers match the one-at-a-time run's, and peak memory (this process: the in-process engines,
cumulative over rows; the server: its own). Questions come from the validation split (never the
test splits). Each row is written to runs/cpu/bench/bench_rollouts.json as it finishes; a rerun skips finished rows.
Usage (from the checkout root, nothing else running; needs `make models-student llama-server`):
    python runs/cpu/bench/bench_rollouts.py [N_WORLD] [N_MATH]"""
import datetime, json, os, platform, resource, sys, time
from pathlib import Path
import torch
from agent_distillation.cli import STUDENTS, load_lm, make_retriever
from agent_distillation.core import load_json, save_json
from agent_distillation.distill import load_student
from agent_distillation.registry import cpu_supports_bf16, load_tokenizer
from agent_distillation.retriever import make_retrieve_tool
from agent_distillation.rollouts import bench_rollouts
from agent_distillation.sandbox import Sandbox
from agent_distillation.teacher import validation_examples, _cpu_model
from agent_distillation.voting import SelfConsistentAction

N_WORLD = int(sys.argv[1]) if len(sys.argv) > 1 else 24
N_MATH = int(sys.argv[2]) if len(sys.argv) > 2 else 8
OUT = Path(os.environ.get('BENCH_OUT', 'runs/cpu/bench/bench_rollouts.json'))
val = validation_examples(0)
qs = [e for e in val if e.source == 'world'][:N_WORLD] + [e for e in val if e.source != 'world'][:N_MATH]
retrieve = make_retrieve_tool(make_retriever('world', 0))
make_sandbox = lambda: Sandbox(tools=[retrieve])
KW = dict(batch_size=16, max_batch=32, student=True, max_steps=5, max_new_tokens=256)
ROWS = [('135m greedy', '135m', None, qs), ('0.5b greedy', '0.5b', None, qs),
        ('135m SAG N=8', '135m', SelfConsistentAction(n=8, seed=0), qs[:N_WORLD // 2] + qs[N_WORLD:N_WORLD + N_MATH // 2])]
flags = open('/proc/cpuinfo').read()

def _peak_gb(pid):
    "A process's peak resident memory (VmHWM), GB."
    kb = next(int(l.split()[1]) for l in open(f'/proc/{pid}/status') if l.startswith('VmHWM'))
    return round(kb / 2**20, 2)
bench = load_json(OUT) if OUT.exists() else dict(results={})
bench['settings'] = dict(questions={name: len(q) for name, *_, q in ROWS}, source='validation split (world, then MATH-medium)',
                         cpu=_cpu_model(), cpu_bf16=cpu_supports_bf16(), avx512f='avx512f' in flags,
                         threads=torch.get_num_threads(), dtype='bfloat16' if cpu_supports_bf16() else 'float32',
                         llama_cpp_slots=16, **{k: v for k, v in KW.items()},
                         regenerate='python runs/cpu/bench/bench_rollouts.py ' + ' '.join(sys.argv[1:]))
only = os.environ.get('ROWS')
for name, size, policy, questions in ROWS:
    if name in bench['results'] or (only and name not in only.split(',')): print(name, 'skipped (done or not asked)'); continue
    s, t0 = STUDENTS[size], time.time()
    model, tok = load_student(s['base'], s['agent']), load_tokenizer(s['base'])
    servers = []
    def serve():
        servers.append(load_lm(s['base'], s['agent'], engine='llama.cpp', parallel=KW['batch_size']))
        return servers[-1]
    try:
        r = bench_rollouts(model, tok, questions, make_sandbox, serve=serve, policy=policy, **KW)
        server_peak = max(_peak_gb(lm.server.proc.pid) for lm in servers)
    finally:
        for lm in servers: lm.close()
    bench['results'][name] = r | dict(student=s['agent'], policy=repr(policy), wall_s=round(time.time() - t0, 1),
                                      peak_rss_gb_this_process=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                                      peak_rss_gb_server=server_peak, date=datetime.datetime.now().isoformat(timespec='seconds'))
    save_json(OUT, bench)
    del model
print(json.dumps(bench, indent=1))
