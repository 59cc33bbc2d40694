# Two commands: `make train` (fresh machine -> venv -> trains the tiny default) and `make test`;
# `make finetune` then LoRA-tunes that model on the standard library's docstrings (README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines take the local CPU wheel of this release; GPU machines keep (or get) a CUDA build.
TORCH_CPU_VERSION ?= 2.13.0
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

export OMP_NUM_THREADS ?= 1
# Without a GPU, Triton kernels run under its interpreter (read when a kernel is decorated, so it
# is set for the whole run; the Hopper compile test clears it in its own subprocess).
ifneq ($(HAVE_GPU),1)
export TRITON_INTERPRET ?= 1
endif

.PHONY: venv test test-fast train finetune clean sandbox

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt $(wildcard csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
ifeq ($(HAVE_GPU),1)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch
else
	$(BIN)/pip install -q torch==$(TORCH_CPU_VERSION)
endif
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: venv sandbox
	$(BIN)/python -m pytest -q tests

# `starcoder eval` runs generated code under bubblewrap: install it where we can (root, as in CI);
# elsewhere the sandbox tests skip and say why.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; } >/dev/null \
		|| echo "bubblewrap not installed (needs root): sandbox tests will skip"; }

train: venv
	$(BIN)/python -m starcoder demo

# The README's fine-tuning example: instruction pairs from the standard library's functions, SFT
# with LoRA on top of the `make train` run (made first if missing), completions of held-out ones.
FT := runs/finetune
FINETUNE_STEPS ?= 60
finetune: venv
	test -f runs/demo/run/checkpoints/latest || $(BIN)/python -m starcoder demo
	$(BIN)/python tools/stdlib_instructions.py --output $(FT)/data/pairs.jsonl --prompts $(FT)/data/prompts.jsonl
	$(BIN)/python -m starcoder preprocess --input $(FT)/data/pairs.jsonl --tokenizer builtin:tiny \
		--output-prefix $(FT)/data/instruct --format instruct --no-progress
	$(BIN)/python -m starcoder train --config tiny-sc2 --set train.init_from=runs/demo/run \
		--set data.paths=[$(FT)/data/instruct] --set data.fim_rate=0 --set data.pack=true \
		--set train.objective=sft --set finetune.lora_rank=8 --set finetune.lora_alpha=16 \
		--set train.lr=1e-3 --set train.min_lr=0 --set train.warmup_steps=5 \
		--set train.max_steps=$(FINETUNE_STEPS) --set train.output_dir=$(FT)/run
	$(BIN)/python -m starcoder generate --model $(FT)/run --prompts $(FT)/data/prompts.jsonl --max-new-tokens 48

clean:
	rm -rf $(VENV) build *.egg-info starcoder/*.so starcoder/**/*.so
