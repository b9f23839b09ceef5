"""Guards for distillation: masking through the real batching, packing boundaries, LoRA training, adapter save/load, merge, resume."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from agent_distillation.distill import (build_sft_dataset, build_sft_example, collate_packed, collate_padded, synthetic_trajectories,
                                        SimilarLengthSampler, TrainConfig, default_lora, train_student, load_student, merge_adapter,
                                        _make_trainer, to_student_messages)
from agent_distillation.registry import load_model, load_tokenizer
from agent_distillation.core import read_jsonl, load_json

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def tok(): return load_tokenizer('tiny-random')

@pytest.fixture(scope='module')
def data(tok):
    return build_sft_dataset(tok, synthetic_trajectories(6, seed=3, extra_steps=2), max_len=1200)[0]

@pytest.fixture(scope='module')
def short(tok):  # short examples keep the training tests fast
    return build_sft_dataset(tok, synthetic_trajectories(4, seed=4), max_len=600)[0]

@pytest.fixture(scope='module')
def tiny(): return load_model('tiny-random', dtype=torch.float32)

def _labels_by_ids(data):
    return {tuple(e['input_ids']): e['labels'] for e in data}

@pytest.mark.parametrize('batching', ['grouped', 'padded', 'packed'])
def test_trainer_batches_keep_the_mask(tok, data, batching, tmp_path):
    "Every batch the Trainer's data loader yields carries exactly the examples' labels; pads and boundaries are -100."
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=2, micro_batch_size=2, batching=batching, dtype='float32')
    dl = _make_trainer('tiny-random', data, default_lora(r=4, lora_alpha=8), cfg, tok).get_train_dataloader()
    want, seen = _labels_by_ids(data), []
    for b in dl:
        ids, labels = b['input_ids'], b['labels']
        if batching == 'packed':
            assert 'attention_mask' not in b and b['use_cache'] is False and ids.shape[0] == 1
            starts = (b['position_ids'][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            rows = [(ids[0, s:e], labels[0, s:e]) for s, e in zip(starts, starts[1:])]
            for s, e in zip(starts, starts[1:]): assert b['position_ids'][0, s:e].tolist() == list(range(e - s))
        else:
            m = b['attention_mask']
            assert (labels[m == 0] == -100).all() and (ids[m == 0] == tok.pad_token_id).all()
            rows = [(ids[i, m[i] == 1], labels[i, m[i] == 1]) for i in range(ids.shape[0])]
        for r_ids, r_labels in rows:
            key = tuple(r_ids.tolist()); exp = list(want[key])
            if batching == 'packed': exp[0] = -100
            assert r_labels.tolist() == exp
            seen.append(key)
    assert sorted(seen) == sorted(want)  # each example exactly once per epoch

@pytest.mark.parametrize('batching', ['grouped', 'packed'])
def test_trainer_loss_is_the_models_own(tok, short, batching, tmp_path):
    "The Trainer's loss (logits only where trained) equals the model's own masked loss on the same batch."
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=4, micro_batch_size=4, batching=batching, dtype='float32')
    tr = _make_trainer('tiny-random', short, default_lora(r=4, lora_alpha=8), cfg, tok)
    b = next(iter(tr.get_train_dataloader()))  # all four examples
    with torch.no_grad():
        ours = tr.compute_loss(tr.model, dict(b)).item()
        own = tr.model(**b).loss.item()
    assert abs(ours - own) < 1e-4
    assert tr.real_tokens == sum(len(e['input_ids']) for e in short)  # real tokens: padding not counted

def test_packed_loss_equals_mean_of_individual_losses(tok, short, tiny):
    "Packed rows attend only within each sequence: same logits per sequence, loss = token-weighted mean of the individual ones."
    feats = short[:3]
    with torch.no_grad():
        alone = [tiny(input_ids=torch.tensor([f['input_ids']]), labels=torch.tensor([f['labels']])) for f in feats]
        n = [sum(l != -100 for l in f['labels'][1:]) for f in feats]
        mean = sum(o.loss.item() * k for o, k in zip(alone, n)) / sum(n)
        packed = tiny(**collate_packed(feats))
        padded = tiny(**collate_padded(feats, tok.pad_token_id))
    assert abs(packed.loss.item() - mean) < 1e-4 and abs(padded.loss.item() - mean) < 1e-4
    s = 0
    for f, o in zip(feats, alone):
        L = len(f['input_ids'])
        assert torch.allclose(packed.logits[0, s:s + L], o.logits[0], atol=1e-4); s += L

def test_truncation_and_drop_counts(tok):
    trajs = synthetic_trajectories(3, seed=5)
    full = [len(build_sft_example(tok, to_student_messages(t['messages']))['input_ids']) for t in trajs]
    def first_end(t):  # tokens up to the end of the first action
        ex = build_sft_example(tok, to_student_messages(t['messages'])[:3])
        return max(i for i, l in enumerate(ex['labels']) if l != -100) + 1
    first = [first_end(t) for t in trajs]
    cap = sorted(full)[0]  # the shortest fits whole, the others must be cut (or dropped if not even their first action fits)
    data, stats = build_sft_dataset(tok, trajs, max_len=cap)
    exp_drop = sum(f > cap for f in first)
    assert stats['records'] == 3 and stats['dropped'] == exp_drop and stats['kept'] == 3 - exp_drop
    assert stats['truncated'] == sum(x > cap for x in full) - exp_drop
    assert all(len(e['input_ids']) <= cap for e in data)
    _, s2 = build_sft_dataset(tok, trajs, max_len=min(first) - 1)
    assert s2['dropped'] == 3 and s2['kept'] == 0

@pytest.fixture(scope='module')
def trained(short, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')/'tiny'
    res = train_student('tiny-random', short, lora=default_lora(r=8, lora_alpha=16), out_dir=str(out), batch_size=2,
                        micro_batch_size=1, max_steps=8, lr=1e-2, dtype='float32', save_steps=4)
    return out, res

def test_lora_training_decreases_loss(trained, short):
    out, res = trained
    log = read_jsonl(out/'train_log.jsonl')
    assert [r['step'] for r in log] == list(range(1, 9))
    assert sum(r['loss'] for r in log[-2:]) < sum(r['loss'] for r in log[:2])  # 4 epochs over 4 examples: it learns them
    assert res.steps == 8 and res.tokens == log[-1]['tokens'] == 4 * sum(len(e['input_ids']) for e in short)  # 8 steps x 2 = 4 epochs
    for f in ('adapter_config.json', 'adapter_model.safetensors', 'settings.json', 'loss.png'): assert (out/f).exists()
    s = load_json(out/'settings.json')
    assert s['lora']['r'] == 8 and s['dataset']['examples'] == 4 and s['config']['lr'] == 1e-2

def test_adapter_round_trip_and_merge(trained, short, tmp_path):
    "The saved adapter loads into a PeftModel with the saved weights; merged weights give the same logits."
    from peft import PeftModel
    from safetensors.torch import load_file
    out, _ = trained
    peft_model = load_student('tiny-random', out, merge=False, dtype='float32')
    assert isinstance(peft_model, PeftModel)
    saved = load_file(out/'adapter_model.safetensors')
    params = dict(peft_model.named_parameters())
    for k, v in saved.items():
        name = next(n for n in params if n.replace('.default', '') == k)
        assert torch.equal(params[name].detach(), v)
    ids = torch.tensor([short[0]['input_ids'][:200]])
    with torch.no_grad():
        base = load_model('tiny-random', dtype=torch.float32)(ids).logits
        adapted = peft_model(input_ids=ids).logits
        merged = load_student('tiny-random', out, dtype='float32')(ids).logits
        folder = load_model(str(merge_adapter('tiny-random', out, tmp_path/'merged', dtype='float32')), dtype=torch.float32)(ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter changed the model
    assert torch.allclose(merged, adapted, atol=1e-4) and torch.allclose(folder, adapted, atol=1e-4)

def test_finished_run_is_not_retrained_and_other_settings_refuse(trained, short):
    out, res = trained
    kw = dict(lora=default_lora(r=8, lora_alpha=16), out_dir=str(out), batch_size=2, micro_batch_size=1, max_steps=8, lr=1e-2,
              dtype='float32', save_steps=4)
    t0 = time.time(); assert train_student('tiny-random', short, **kw) == res and time.time() - t0 < 5
    with pytest.raises(ValueError, match='other settings'): train_student('tiny-random', short, **{**kw, 'lr': 1e-3})

RUN = """
import sys, json, os, signal
from agent_distillation import distill
from agent_distillation.distill import train_student, default_lora
if len(sys.argv) > 3:  # die by SIGKILL right after step `argv[3]` is logged: past a checkpoint, before the next
    die_at, on_log = int(sys.argv[3]), distill._LogCallback.on_log
    def dying(self, args, state, control, **kw):
        on_log(self, args, state, control, **kw)
        if state.global_step == die_at: os.kill(os.getpid(), signal.SIGKILL)
    distill._LogCallback.on_log = dying
data = json.load(open(sys.argv[1]))
train_student('tiny-random', data, lora=default_lora(r=8, lora_alpha=16), out_dir=sys.argv[2], batch_size=2, micro_batch_size=1,
              max_steps=6, lr=1e-2, dtype='float32', save_steps=2, save_total_limit=2)
"""

def test_resume_after_kill(short, tmp_path):
    "A run killed mid-way resumes from its last complete checkpoint: every step logged once, same final weights as an uninterrupted run."
    import json
    from safetensors.torch import load_file
    (tmp_path/'data.json').write_text(json.dumps(short))
    killed, whole = tmp_path/'killed', tmp_path/'whole'
    # the kill is deterministic (a wall-clock kill raced a fast machine): step 5 is logged, checkpoint-4 is the last one
    p = subprocess.run([sys.executable, '-c', RUN, str(tmp_path/'data.json'), str(killed), '5'], capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert not (killed/'settings.json').exists() and not (killed/'adapter_model.safetensors').exists()
    assert [r['step'] for r in read_jsonl(killed/'train_log.jsonl')] == [1, 2, 3, 4, 5]
    assert sorted(c.name for c in killed.glob('checkpoint-*')) == ['checkpoint-2', 'checkpoint-4']
    subprocess.run([sys.executable, '-c', RUN, str(tmp_path/'data.json'), str(killed)], check=True, capture_output=True)
    subprocess.run([sys.executable, '-c', RUN, str(tmp_path/'data.json'), str(whole)], check=True, capture_output=True)
    log = read_jsonl(killed/'train_log.jsonl')
    assert [r['step'] for r in log] == list(range(1, 7))
    assert len(read_jsonl(killed/'sessions.jsonl')) == 2
    ref = read_jsonl(whole/'train_log.jsonl')
    assert [r['tokens'] for r in log] == [r['tokens'] for r in ref]  # same batches in the same order
    for a, b in zip(log, ref): assert abs(a['loss'] - b['loss']) < 1e-3
    wa, wb = load_file(killed/'adapter_model.safetensors'), load_file(whole/'adapter_model.safetensors')
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)

def test_two_processes_match_one(short, tmp_path):
    "The entry point under torchrun (2 gloo processes on CPU) trains like one process with accumulation, step for step."
    from agent_distillation.core import write_jsonl
    recs = synthetic_trajectories(4, seed=4)
    write_jsonl(tmp_path/'agent.jsonl', recs)
    args = ['-m', 'agent_distillation.distill', str(tmp_path/'agent.jsonl'), '--base', 'tiny-random', '--max_len', '600',
            '--max_steps', '3', '--batch_size', '4', '--lora_r', '8', '--lora_alpha', '16']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    torchrun = Path(sys.executable).parent/'torchrun'
    subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_port', '29561', *args, '--out_dir', str(tmp_path/'two')],
                   check=True, capture_output=True, env=env, timeout=300)
    subprocess.run([sys.executable, *args, '--out_dir', str(tmp_path/'one')], check=True, capture_output=True, env=env, timeout=300)
    two, one = read_jsonl(tmp_path/'two'/'train_log.jsonl'), read_jsonl(tmp_path/'one'/'train_log.jsonl')
    assert load_json(tmp_path/'two'/'settings.json')['derived']['world_size'] == 2
    assert [r['step'] for r in two] == [1, 2, 3]  # written once, by the first process
    total = sum(len(e['input_ids']) for e in short)  # the same 4 examples: one epoch per step
    assert [r['tokens'] for r in two] == [r['tokens'] for r in one] == [total, 2 * total, 3 * total]
    for a, b in zip(two, one): assert abs(a['loss'] - b['loss']) < 1e-3

def test_empty_dataset_is_an_error(tmp_path):
    "Nothing to train on is a clear error, not a finished run of zero steps."
    with pytest.raises(ValueError, match='empty dataset'):
        train_student('tiny-random', [], out_dir=str(tmp_path/'run'), max_steps=1)
    assert not (tmp_path/'run'/'settings.json').exists()

def test_full_finetune_trains_every_weight_and_loads_like_an_adapter(short, tiny, tmp_path):
    "lora=False: float32 training of all weights; the run folder is a model `load_student`, `cli.load_lm` and llama-server (as GGUF) take."
    from agent_distillation.distill import is_full_run, TrainResult
    from agent_distillation.cli import load_lm
    out = tmp_path/'full'
    res = train_student('tiny-random', short, lora=False, out_dir=str(out), batch_size=2, max_steps=2, lr=1e-3, save_steps=1)
    s = load_json(out/'settings.json')
    assert s['lora'] is None and s['config']['dtype'] == 'float32' and is_full_run(out) and not (out/'adapter_config.json').exists()
    assert s['adapter']['file'] == 'model.safetensors' and s['adapter']['dtype'] == ['BF16']
    model = load_student('tiny-random', out, dtype=torch.float32)
    mats = {n: w for n, w in model.named_parameters() if w.ndim == 2}  # norms' 1.0 +- 1e-3 rounds back to 1.0 in bf16
    assert 'model.embed_tokens.weight' in mats and len(mats) > 10
    assert all(not torch.allclose(w, tiny.get_parameter(n), atol=1e-4) for n, w in mats.items())  # LoRA never moves the embedding
    assert train_student('tiny-random', short, lora=False, out_dir=str(out), batch_size=2, max_steps=2, lr=1e-3, save_steps=1) == res
    lm = load_lm('tiny-random', str(out))
    assert type(lm).__name__ == 'PrefixCacheLM'
    from agent_distillation.cli import resolve_engine
    if resolve_engine('smollm2-135m-instruct') == 'llama.cpp':  # `make test` builds llama-server: the run served as its own bf16 GGUF
        served = load_lm('tiny-random', str(out), engine='llama.cpp', parallel=1)
        try:
            assert type(served).__name__ == 'OpenAILM' and served.server.gguf.suffix == '.gguf' and '--lora' not in served.server.args
            [[text]] = served.generate([[{'role': 'user', 'content': 'Say hi.'}]], max_new_tokens=4)
            assert isinstance(text, str)
        finally: served.close()
    with pytest.raises(ValueError, match="fine-tuned from 'tiny-random'"): load_lm('smollm2-135m-instruct', str(out))
    with pytest.raises(ValueError, match='other settings'):  # the same folder asked for LoRA is not the finished full run
        train_student('tiny-random', short, lora=default_lora(r=4, lora_alpha=8), out_dir=str(out), batch_size=2, max_steps=2,
                      lr=1e-3, save_steps=1, dtype='float32')
    from agent_distillation.distill import students_report
    assert students_report(tmp_path).loc['full', 'LoRA r'] == 'full'

def test_drop_typed_leaves_out_typed_answers_to_computed_questions(tok):
    "On the first teacher run's records: `drop_typed` removes exactly the kept trajectories `typed_answer` flags (`sft_examples`, which both entry points use)."
    from agent_distillation.distill import typed_answer, _sft_data as distill_data, sft_examples
    from agent_distillation.teacher import filter_trajectories
    path = ROOT/'runs/cpu/teacher/agent.jsonl'
    kept = filter_trajectories(read_jsonl(path))[0]
    typed = [r for r in kept if typed_answer(r)]
    assert 0 < len(typed) < len(kept)
    from agent_distillation.teacher import _question_types
    kinds = _question_types(0)  # only questions that need computing: math, or world arithmetic (a looked-up year is not)
    assert {r['domain'] if r['domain'] == 'math' else kinds[r['id']] for r in typed} == {'math', 'arithmetic'}
    assert any(kinds.get(r['id']) == 'bridge' and str(r['gold']).isdigit() for r in kept)  # such years exist and are kept
    full, _ = sft_examples(tok, read_jsonl(path), 'agent', 8192)
    fewer, _ = sft_examples(tok, read_jsonl(path), 'agent', 8192, drop_typed=True)
    assert len(full) == len(kept) and len(fewer) == len(kept) - len(typed)
    assert len(distill_data(str(path), 'agent', tok, 8192, drop_typed=True)) == len(fewer)
