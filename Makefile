# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv/ and install requirements.txt on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DEMO_DIR     ?= demo
DEMO_DATA    := $(DEMO_DIR)/ctrate
DEMO_OUT     := $(DEMO_DIR)/output
DEMO_TEXT    := $(DEMO_DIR)/text_encoder
DEMO_TRAIN   ?= 1000
DEMO_VALID   ?= 200
DEMO_SEED    ?= 0
NPROC        ?= 2
DEMO_TRAIN_ARGS ?=
DATA_ARGS    := --data-root $(DEMO_DATA) --config configs/pipeline_demo.yaml --workers $(NPROC)

.PHONY: install demo test test-fast clean-demo

install: $(STAMP)
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# The whole method on the embedded synthetic CT-RATE: data -> text encoder -> pre-training -> zero-shot -> metrics.
demo: $(STAMP)
	$(PY) -m data.synthetic --data-root $(DEMO_DATA) --n-train $(DEMO_TRAIN) --n-valid $(DEMO_VALID) --seed $(DEMO_SEED) --workers $(NPROC)
	for split in train valid; do \
	  $(PY) -m data.fix_data $(DATA_ARGS) --split $$split && \
	  $(PY) -m data.generate_mask $(DATA_ARGS) --split $$split --masks-from $(DEMO_DATA)/totalseg_gt && \
	  $(PY) -m data.resize $(DATA_ARGS) --split $$split && \
	  $(PY) -m data.preprocess $(DATA_ARGS) --split $$split || exit 1; \
	done
	$(PY) pretrain_text.py --config configs/demo.yaml --data-root $(DEMO_DATA) --text-encoder $(DEMO_TEXT)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py \
	  --config configs/demo.yaml --data-root $(DEMO_DATA) --text-encoder $(DEMO_TEXT) --output-dir $(DEMO_OUT) \
	  --resume $(DEMO_TRAIN_ARGS)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) eval.py \
	  --config configs/demo.yaml --data-root $(DEMO_DATA) --text-encoder $(DEMO_TEXT) --output-dir $(DEMO_OUT) \
	  --csv_file $(DEMO_OUT)/zeroshot_valid.csv --overwrite
	$(PY) calc_metrics.py --csv_file $(DEMO_OUT)/zeroshot_valid.csv --data-root $(DEMO_DATA)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf $(DEMO_DIR)
