"""Probe: does a rule asking for numbers computed in code make the teacher compute instead of typing? (issue 18, item 4)
Runs the teacher agent on N world arithmetic questions from the 'rest' split (never validation), once per rule variant.
Usage (from the checkout root; needs `make models-big` and llama-server): python runs/cpu/teacher-probe/probe_compute.py [N]"""
import json, sys, time, datetime, random
from pathlib import Path
import agent_distillation.prompts as P
from agent_distillation.teacher import world_train_splits, generate_all, _constant_answer, record_correct, _cpu_model
from agent_distillation.models import LlamaServer, OpenAILM
from agent_distillation.sandbox import Sandbox
from agent_distillation.retriever import make_retrieve_tool
from agent_distillation.world import make_world_benchmark, world_retriever
from agent_distillation.core import read_jsonl, save_json

N = int(sys.argv[1]) if len(sys.argv) > 1 else 40
OUT = Path('runs/cpu/teacher-probe')
BASE_RULE = P.RULES
COMPUTE_RULE = BASE_RULE.replace(
    "4. Compute with Python (numbers, dates, comparisons) instead of doing arithmetic in your head.",
    "4. Never do arithmetic in your Thought and never type a number you worked out: assign each retrieved number to a "
    "variable and let the code compute the answer, e.g. `founded = 1874; published = 1896; final_answer(published - founded)`.")
assert COMPUTE_RULE != BASE_RULE
rest = [e for e in world_train_splits(0)['rest'] if e.meta['type'] == 'arithmetic']
qs = random.Random('probe-compute').sample(rest, N)
retrieve = make_retrieve_tool(world_retriever(make_world_benchmark(0)), k=3)
summary = {}
t_all = time.time()
with LlamaServer('qwen2.5-coder-1.5b-instruct', n_ctx=8192, parallel=8) as srv:
    lm = OpenAILM(srv.base_url, srv.model, tokenizer='qwen2.5-coder-1.5b-instruct', max_concurrency=8)
    for name, rule in (('baseline', BASE_RULE), ('compute_rule', COMPUTE_RULE)):
        P.RULES = rule
        t0 = time.time()
        generate_all(qs, lm, lambda: Sandbox(tools=[retrieve]), OUT/name, workers=8, modes=('agent',),
                     max_steps=5, max_new_tokens=512, step_prefix='Thought:')
        rs = [r for r in read_jsonl(OUT/name/'agent.jsonl') if r['id'] in {e.id for e in qs}]
        answered = [r for r in rs if r['answered']]
        typed = sum(map(_constant_answer, answered))
        summary[name] = dict(n=len(rs), correct=sum(map(record_correct, rs)), answered=len(answered), typed_constant=typed,
                             computed_in_code=len(answered) - typed, wall_s=round(time.time() - t0, 1),
                             prompts_hash=P.all_prompts_hash(), rule4=rule.splitlines()[4])
        print(name, summary[name], flush=True)
P.RULES = BASE_RULE
save_json(OUT/'summary.json', dict(date=datetime.datetime.now().isoformat(timespec='seconds'), cpu=_cpu_model(),
          model='qwen2.5-coder-1.5b-instruct', sampling='greedy, max 5 steps, 512 tokens/step, step prefix Thought:',
          questions=[e.id for e in qs], question_seed='probe-compute', wall_s=round(time.time() - t_all, 1), results=summary,
          regenerate='python runs/cpu/teacher-probe/probe_compute.py 40'))
