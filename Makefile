# dist-vdr: the two commands of the README.
#   make demo   set up .venv, build the tiny model and pages, train on 2 CPU processes, evaluate
#   make test   set up .venv (if needed) and run the test suite
#   make test-fast   the unit tests only (tests/unit, under a minute)
#   make lint   ruff over the package, tests and launch scripts (config: pyproject.toml)
#   make demo-lora       the demo with a LoRA adapter (configs/tiny-lora.yaml)
#   make demo-reranker   after demo: the tiny reranker (warm-started, mined negatives), retrieval vs reranked
#   make demo-distill    after demo: a student distilled from the demo's model (configs/tiny-distill.yaml)
#   make demo-pdfs       a folder of generated PDFs -> page corpus -> mined negatives -> training (docs/data.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the wheels of this machine's disk where it has them (see README, Installation).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEEPSPEED_SPEC ?= deepspeed==0.19.8 ninja
STAMP := $(VENV)/.dist-vdr-installed
DEMO_DIR ?= artifacts
DEMO_RUN ?= runs/tiny
DEMO_RERANKER_RUN ?= runs/tiny-reranker
DEMO_LORA_RUN ?= runs/tiny-lora
DEMO_DISTILL_RUN ?= runs/tiny-distill
DEMO_MULTI_VECTOR_RUN ?= runs/tiny-multi-vector
DEMO_PDFS_RUN ?= runs/tiny-pdfs
PYTEST_ARGS ?=

.PHONY: demo demo-multi-vector demo-lora demo-reranker demo-distill demo-pdfs test test-fast lint venv clean-demo system-deps bench-wheels bench-fast-plaid-venv

venv: $(STAMP)

# constraints.txt: the exact versions the suite and the demo figures were measured with (a fresh
# machine would otherwise install the newest releases the ranges allow, which nobody has run).
$(STAMP): setup.cfg pyproject.toml constraints.txt requirements-references.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH_SPEC)
	# DeepSpeed ships only an sdist whose build imports torch: build it against the torch above.
	$(BIN)/python -m pip install -q --no-build-isolation -c constraints.txt $(DEEPSPEED_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps -r requirements-references.txt
	touch $@

# The demo's arithmetic capped to AVX2: the same figure on every x86-64 CPU (launch/same-x86-arithmetic.env).
SAME_ARITHMETIC = env $$(grep -v '^\#' launch/same-x86-arithmetic.env)

demo: $(STAMP)
	$(SAME_ARITHMETIC) $(BIN)/dist-vdr make-tiny-model $(DEMO_DIR)/tiny-model
	$(SAME_ARITHMETIC) $(BIN)/dist-vdr make-synthetic-pages $(DEMO_DIR)/pages --num-train 4000
	$(SAME_ARITHMETIC) PYTHON=$(BIN)/python launch/train.sh launch/cpu.yaml --config configs/tiny.yaml \
		model.name_or_path=$(DEMO_DIR)/tiny-model data.path=$(DEMO_DIR)/pages training.output_dir=$(DEMO_RUN)

# The demo's data and budget with a multi-vector model (configs/tiny-multi-vector.yaml, docs/multi-vector.md),
# then both runs side by side: NDCG@10 before/after at every dim and the bytes a page costs to store.
demo-multi-vector: demo
	$(SAME_ARITHMETIC) $(BIN)/dist-vdr make-tiny-model --multi-vector $(DEMO_DIR)/tiny-multi-vector
	$(SAME_ARITHMETIC) PYTHON=$(BIN)/python launch/train.sh launch/cpu.yaml --config configs/tiny-multi-vector.yaml \
		model.name_or_path=$(DEMO_DIR)/tiny-multi-vector data.path=$(DEMO_DIR)/pages \
		training.output_dir=$(DEMO_MULTI_VECTOR_RUN)
	$(BIN)/dist-vdr report $(DEMO_RUN) $(DEMO_MULTI_VECTOR_RUN)

# The demo with a LoRA adapter (docs/adapters.md): the base frozen, only the adapter trained and saved.
demo-lora: $(STAMP)
	$(BIN)/dist-vdr make-tiny-model $(DEMO_DIR)/tiny-model
	$(BIN)/dist-vdr make-synthetic-pages $(DEMO_DIR)/pages --num-train 4000
	PYTHON=$(BIN)/python launch/train.sh launch/cpu.yaml --config configs/tiny-lora.yaml \
		model.name_or_path=$(DEMO_DIR)/tiny-model data.path=$(DEMO_DIR)/pages training.output_dir=$(DEMO_LORA_RUN)

# The tiny reranker on top of the demo: starts from the demo's trained embedding backbone, mines
# negatives with it, trains on 2 CPU processes and reports NDCG@10 of retrieval vs reranked.
demo-reranker: demo
	$(BIN)/dist-vdr make-tiny-model --reranker $(DEMO_DIR)/tiny-reranker --init-from $(DEMO_RUN)/final
	PYTHON=$(BIN)/python launch/train.sh launch/cpu.yaml --config configs/tiny-reranker.yaml \
		model.name_or_path=$(DEMO_DIR)/tiny-reranker reranker.retriever=$(DEMO_RUN)/final \
		data.path=$(DEMO_DIR)/pages training.output_dir=$(DEMO_RERANKER_RUN)

# Distillation on top of the demo (configs/tiny-distill.yaml): the demo's model is the teacher, its
# scores of the training rows' own pages are added (score-rows, 2 ranks), a 1-epoch student learns from them.
demo-distill: demo
	$(BIN)/python -m accelerate.commands.launch --config_file launch/cpu.yaml \
		--num_processes 2 -m dist_vdr.cli score-rows --config configs/tiny-distill.yaml \
		--teacher $(DEMO_RUN)/final --data $(DEMO_DIR)/pages --out $(DEMO_DIR)/pages-distill --device cpu
	PYTHON=$(BIN)/python launch/train.sh launch/cpu.yaml --config configs/tiny-distill.yaml \
		model.name_or_path=$(DEMO_DIR)/tiny-model data.path=$(DEMO_DIR)/pages-distill \
		data.eval_path=$(DEMO_DIR)/pages training.output_dir=$(DEMO_DISTILL_RUN)

# The walkthrough of docs/data.md ("Your documents") on generated PDFs: page corpus, negatives mined over the
# whole corpus on 2 ranks, training on rows naming pages by id, eval from query/qrels files.
demo-pdfs: $(STAMP)
	$(BIN)/dist-vdr make-tiny-model $(DEMO_DIR)/tiny-model
	$(BIN)/dist-vdr make-synthetic-pdfs $(DEMO_DIR)/pdfs --num-documents 1000 --num-scans 200
	$(BIN)/dist-vdr pages build --input $(DEMO_DIR)/pdfs/documents --out $(DEMO_DIR)/corpus --dpi 20
	OMP_NUM_THREADS=1 $(BIN)/python -m accelerate.commands.launch --config_file launch/cpu.yaml \
		-m dist_vdr.cli mine-negatives --model $(DEMO_DIR)/tiny-model --corpus $(DEMO_DIR)/corpus \
		--queries $(DEMO_DIR)/pdfs/train_queries.jsonl --qrels $(DEMO_DIR)/pdfs/train_qrels.trec \
		--out $(DEMO_DIR)/mined --num-negatives 1 --max-rank 100 --max-uses-per-page 3 \
		--exclude-same-document --device cpu
	PYTHON=$(BIN)/python launch/train.sh launch/cpu.yaml --config configs/tiny.yaml \
		model.name_or_path=$(DEMO_DIR)/tiny-model training.output_dir=$(DEMO_PDFS_RUN) \
		data.path=$(DEMO_DIR)/mined data.pages_path=$(DEMO_DIR)/corpus data.eval_path=$(DEMO_DIR)/corpus \
		data.eval_queries_file=$(DEMO_DIR)/pdfs/eval_queries.jsonl data.eval_qrels_file=$(DEMO_DIR)/pdfs/eval_qrels.trec

# The SLURM integration tests run a real two-node cluster on this host (Debian's slurmctld + slurmd).
# As root with apt-get they are installed here; elsewhere those tests are skipped with the reason.
# DeepSpeed on CPU JIT-compiles a small C++ op (gcc/g++; ninja comes from pip).
system-deps:
	@if ! command -v slurmctld >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null; \
	  else echo "note: slurmctld/slurmd not installed (needs root + apt-get): SLURM tests will be skipped"; fi; \
	fi
	@if ! command -v g++ >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; \
	  else echo "note: no g++ (needs root + apt-get to install): the DeepSpeed CPU tests will fail"; fi; \
	fi

# Both folders (tests/unit, tests/integration), the slowest 25 tests listed at the end (docs/testing.md). Two
# pytest workers (pytest-xdist), each test module on one of them: the suite's own processes leave a core idle
# about half the time (waits on SLURM, signals, checkpoints, process starts).
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests/unit tests/integration --durations=25 $(PYTEST_ARGS)

# The unit tests alone (no process group, no launcher, no training run): the loop while editing.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check dist_vdr tests launch slurm

# Wheels for a GPU machine without internet (WHEELS=wheels launch/bench_gpu.sh OUT): what dist-vdr
# needs beyond the image's torch, transformers and accelerate, at this venv's versions, for its
# Python (3.12 on the lent GPU machines).
BENCH_WHEELS := sentence-transformers datasets pyarrow dill multiprocess xxhash fsspec omegaconf \
	antlr4-python3-runtime tqdm pandas python-dateutil pytz tzdata faiss-cpu pypdfium2 peft
BENCH_PYTHON ?= 3.12
bench-wheels: $(STAMP)
	rm -rf wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(BENCH_PYTHON) \
		--platform manylinux_2_28_x86_64 -d wheels $$($(BIN)/python -m pip freeze | \
		grep -iE "^($$(echo $(BENCH_WHEELS) | tr ' ' '|'))==")

# fast-plaid for `dist-vdr bench eval-multi-vector --fast-plaid-python .venv-fast-plaid/bin/python` (its own torch).
bench-fast-plaid-venv:
	$(PYTHON) -m venv .venv-fast-plaid
	.venv-fast-plaid/bin/python -m pip install -q --upgrade pip
	.venv-fast-plaid/bin/python -m pip install -q -r requirements-fast-plaid.txt

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_RUN) $(DEMO_RERANKER_RUN) $(DEMO_PDFS_RUN) $(DEMO_LORA_RUN) $(DEMO_DISTILL_RUN)
