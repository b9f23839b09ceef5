"""Do llama.cpp and transformers agree on the 135M student when llama.cpp runs it in bf16 (not the 4-bit base GGUF)?

The 135M base (its registry GGUF de-quantised into an HF folder, bf16) converted back to a bf16 GGUF with
`serving.hf_to_gguf`, served by llama-server, against the same weights in-process (`TransformersLM`, bf16): greedy
answers to the first N world-validation questions, as plain chat turns. A fully fine-tuned student is served the same
way. The registry's 4-bit GGUF, which the LoRA students run on, is the row to compare with. Prints and writes
engine_bf16_135m.json: answers identical to the in-process ones, and the mean shared prefix (characters).

    python runs/cpu/bench/engine_bf16_135m.py 20
"""
import json, sys, time
from pathlib import Path
from agent_distillation.registry import model_dir, gguf_path
from agent_distillation.serving import hf_to_gguf
from agent_distillation.models import LlamaServer, OpenAILM, TransformersLM
from agent_distillation.cli import load_examples

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
BASE = 'smollm2-135m-instruct'
msgs = [[{'role': 'user', 'content': e.question}] for e in load_examples('world_validation')[:N]]
t = time.time(); ours = TransformersLM(BASE, max_batch=N).generate(msgs, max_new_tokens=128); t_hf = time.time() - t
def served_answers(gguf):
    with LlamaServer(gguf, model=BASE, parallel=N) as srv:
        t = time.time(); out = OpenAILM(srv.base_url, BASE, tokenizer=BASE, max_concurrency=N).generate(msgs, max_new_tokens=128)
    return [o[0] for o in out], time.time() - t
def shared(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]: n += 1
    return n
ours = [o[0] for o in ours]
res = dict(model=BASE, n=N, max_new_tokens=128, transformers_s=round(t_hf, 1), date=time.strftime('%Y-%m-%d'), rows={})
for name, gguf in [('llama.cpp bf16 GGUF (hf_to_gguf)', hf_to_gguf(model_dir(BASE))), ('llama.cpp 4-bit registry GGUF (Q4_1)', gguf_path(BASE))]:
    theirs, secs = served_answers(gguf)
    res['rows'][name] = dict(gguf=gguf.name, identical_to_transformers=sum(a == b for a, b in zip(ours, theirs)),
                             mean_shared_prefix_chars=round(sum(shared(a, b) for a, b in zip(ours, theirs)) / N, 1),
                             mean_chars=round(sum(map(len, ours)) / N, 1), seconds=round(secs, 1),
                             examples=[dict(transformers=a, llama_cpp=b) for a, b in list(zip(ours, theirs))[:2]])
Path(__file__).with_suffix('.json').write_text(json.dumps(res, indent=1))
print({k: {kk: vv for kk, vv in v.items() if kk != 'examples'} for k, v in res['rows'].items()})
