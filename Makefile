# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch; a range would let pip pick a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[demo,test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/exitwise study --dataset digits --model digits-convnet --out demo-report

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) demo-report
