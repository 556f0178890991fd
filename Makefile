# chestdx: two commands for a newcomer.
#   make demo  - set up, train the default model on real data if none is installed, evaluate, report
#   make test  - set up and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN := runs/demo
# Extra training options for the demo, e.g. make demo DEMO_ARGS="--set train.epochs=2"
DEMO_ARGS ?=
CHESTDX_HOME ?= $(HOME)/.chestdx
export CHESTDX_HOME

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch/torchvision first, pinned, so pip never picks another build for a dependency.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: setup
	@if [ -f "$(CHESTDX_HOME)/models/default.pt" ]; then \
		echo "Using the installed model $(CHESTDX_HOME)/models/default.pt (delete it to retrain)"; \
	else \
		echo "No installed model: training LA-DNN on covid-ct (CPU, ~15 min)"; \
		$(BIN)/chestdx train --config configs/ladnn_covidct.yaml --run-dir $(DEMO_RUN) --install --no-evaluate $(DEMO_ARGS); \
	fi
	$(BIN)/chestdx evaluate --out $(DEMO_RUN)/report
	@echo "Report: $(DEMO_RUN)/report/report.html"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/reproduce_ladnn.py --jpeg-check

clean:
	rm -rf runs .pytest_cache
