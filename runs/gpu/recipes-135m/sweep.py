"""The 135M student's recipe sweep (students issue, item 3): LoRA r16 / LoRA r64 / full fine-tuning x 2 / 4 epochs.

Each recipe trains SmolLM2-135M-Instruct on the first teacher run's kept agent trajectories
(`runs/cpu/teacher/agent.jsonl`, the data of the committed 135M student) and is scored greedily, agent-distill method,
on the validation split (`runs/cpu/validation.json`: 150 world + 60 MATH-medium questions) and on 50 of the
questions it trained on (a fit check). Recipes run side by side, one process each.

    python runs/gpu/recipes-135m/sweep.py prep            # convert the model, build the BM25 index (once)
    python runs/gpu/recipes-135m/sweep.py all             # every recipe, in parallel processes; then the table
    python runs/gpu/recipes-135m/sweep.py one r16-e2      # one recipe: train (resumable), then score (resumable)
    python runs/gpu/recipes-135m/sweep.py table           # the summary (summary.json + a markdown table)

`--device` is where scoring runs; training runs on CUDA whenever torch sees a GPU (the `Trainer`'s choice). Works on a
CPU too (`--device cpu`, one recipe at a time: hours); made for a lent GPU, where it takes minutes. Records are written
as questions finish (64 in flight), so a cut run holds the questions that finished, not a prefix of the split.
"""
import argparse, hashlib, json, os, random, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
DATA = ROOT/'runs/cpu/teacher/agent.jsonl'
BASE = 'smollm2-135m-instruct'
LORA16, LORA64 = ['--lora_r', '16', '--lora_alpha', '32'], ['--lora_r', '64', '--lora_alpha', '128']
FULL = ['--full_finetune', '--lr', '5e-5']   # full fine-tuning: a tenth of LoRA's 2e-4 per-weight step size is usual
CONFIGS = {'r16-e2': LORA16 + ['--epochs', '2'], 'r16-e4': LORA16 + ['--epochs', '4'],
           'r64-e2': LORA64 + ['--epochs', '2'], 'r64-e4': LORA64 + ['--epochs', '4'],
           'full-e2': FULL + ['--epochs', '2'], 'full-e4': FULL + ['--epochs', '4']}
N_TRAIN_QUESTIONS = 50


def train_questions(seed: int = 0):
    "50 world questions of the first teacher run whose trajectory the students trained on (kept: correct, parsed)."
    from agent_distillation.teacher import world_train_splits, filter_trajectories
    recs = [json.loads(l) for l in DATA.read_text().splitlines() if l.strip()]
    kept = {r['id'] for r in filter_trajectories(recs)[0]}
    exs = [e for e in world_train_splits(seed)['first'] if e.id in kept]
    return random.Random(seed).sample(exs, min(N_TRAIN_QUESTIONS, len(exs)))


def prep():
    "Build what every recipe shares once (the parallel processes would race for it)."
    from agent_distillation.registry import model_dir, load_tokenizer
    from agent_distillation.cli import make_retriever
    t = time.time(); model_dir(BASE); load_tokenizer(BASE); make_retriever('world', 0)
    print(f'prep: {time.time() - t:.0f} s', flush=True)


def one(name: str, device: str, batch_size: int, smoke: bool = False):
    "Train one recipe (resumable), then score it on validation and on training questions (resumable records)."
    from agent_distillation.cli import make_method, load_examples
    from agent_distillation.evaluate import evaluate as run_eval
    out = HERE/name
    t0 = time.time()
    subprocess.run([sys.executable, '-m', 'agent_distillation.distill', str(DATA), '--out_dir', str(out), '--base', BASE,
                    *CONFIGS[name], *(['--max_steps', '1'] if smoke else [])], check=True)
    t1 = time.time()
    val = load_examples('world_validation', 2 if smoke else None) + load_examples('math_validation', 1 if smoke else None)
    with make_method('agent_distill', BASE, str(out), 'none', engine='transformers', device=device, batch_size=batch_size) as m:
        run_eval(m, train_questions()[:2 if smoke else None], out=str(HERE/f'{name}.train.jsonl'))  # the fit check first: short
        run_eval(m, val, out=str(HERE/f'{name}.validation.jsonl'))
    (HERE/f'{name}.times.json').write_text(json.dumps(dict(train_s=round(t1 - t0, 1), score_s=round(time.time() - t1, 1),
                                                          device=device, batch_size=batch_size)))


def run_all(device: str, batch_size: int, names, smoke: bool = False):
    "Every recipe in its own process, side by side; logs in <name>.log."
    procs = {n: subprocess.Popen([sys.executable, __file__, 'one', n, '--device', device, '--batch_size', str(batch_size)]
                                 + (['--smoke'] if smoke else []),
                                 stdout=open(HERE/f'{n}.log', 'a'), stderr=subprocess.STDOUT) for n in names}
    for n, p in procs.items(): print(n, 'exit', p.wait(), flush=True)


def _acc(path: Path, world=None):
    "Accuracy (%) and count of a records file's `acc` (`scoring.is_correct`); world=True/False: world / other (MATH) records."
    rs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    rs = [r for r in rs if world is None or (r.get('source') == 'world') == world]
    return (round(100 * sum(r['acc'] for r in rs) / len(rs), 1), len(rs)) if rs else (None, 0)


def table():
    "summary.json and a markdown table: validation accuracy (world, MATH), training-question accuracy, loss, speed, time."
    rows = {}
    for n in CONFIGS:
        d = HERE/n
        if not (d/'settings.json').exists(): continue
        s = json.loads((d/'settings.json').read_text())
        times = json.loads((HERE/f'{n}.times.json').read_text()) if (HERE/f'{n}.times.json').exists() else {}
        w, nw = _acc(HERE/f'{n}.validation.jsonl', True); m, nm = _acc(HERE/f'{n}.validation.jsonl', False)
        t, nt = _acc(HERE/f'{n}.train.jsonl')
        log = [json.loads(l) for l in (d/'train_log.jsonl').read_text().splitlines() if '"loss"' in l]
        last = [r['loss'] for r in log if r['epoch'] > max(r['epoch'] for r in log) - 1 + 1e-9] if log else []
        rows[n] = dict(validation_world=w, n_world=nw, validation_math=m, n_math=nm, train_questions=t, n_train=nt,
                       first_loss=s.get('first_loss'), final_loss=s.get('final_loss'),
                       last_epoch_loss=round(sum(last) / len(last), 3) if last else None, steps=s.get('steps'),
                       examples=s.get('dataset', {}).get('examples'), tokens_per_s=s.get('tokens_per_s'), finished=s.get('finished'),
                       device=s.get('derived', {}).get('device'), versions=s.get('versions'), trained=s.get('sessions'), **times,
                       weights_sha256=s.get('adapter', {}).get('sha256'), weights_mb=round(s.get('adapter', {}).get('bytes', 0) / 1e6, 1))
    env = dict(data=str(DATA.relative_to(ROOT)), data_sha256=hashlib.sha256(DATA.read_bytes()).hexdigest(), base=BASE,
               configs={k: ' '.join(v) for k, v in CONFIGS.items()}, summarized=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    (HERE/'summary.json').write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    cols = ['validation_world', 'validation_math', 'train_questions', 'last_epoch_loss', 'steps', 'tokens_per_s', 'train_s', 'score_s', 'weights_mb']
    print('| recipe | ' + ' | '.join(cols) + ' |\n|' + '---|' * (len(cols) + 1))
    for n, r in rows.items(): print(f'| {n} | ' + ' | '.join(str(r.get(c)) for c in cols) + ' |')
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('what', choices=['prep', 'all', 'one', 'table'])
    ap.add_argument('name', nargs='?', choices=list(CONFIGS))
    ap.add_argument('--device', default='auto', help="'cuda', 'cpu' or 'auto'")
    ap.add_argument('--batch_size', type=int, default=64, help='conversations in flight per recipe')
    ap.add_argument('--only', default=','.join(CONFIGS), help='recipes for `all`, comma-separated')
    ap.add_argument('--smoke', action='store_true', help='a check of the script: 1 training step, 5 questions, into smoke/')
    a = ap.parse_args()
    if a.smoke: HERE = HERE/'smoke'; HERE.mkdir(exist_ok=True)
    if a.what == 'prep': prep()
    elif a.what == 'one' and not a.name: ap.error('`one` needs a recipe name')
    elif a.what == 'one': one(a.name, a.device, a.batch_size, a.smoke)
    elif a.what == 'all': run_all(a.device, a.batch_size, a.only.split(','), a.smoke); table()
    else: table()
