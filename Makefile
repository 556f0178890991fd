# chestdx: two commands for a newcomer.
#   make demo  - set up, train the default model on real data if none is installed, evaluate, report,
#                then start the web service (Ctrl-C stops it; DEMO_SERVE=0 skips it)
#   make test  - set up and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN := runs/demo
# Extra training options for the demo, e.g. make demo DEMO_ARGS="--set train.epochs=2"
DEMO_ARGS ?=
DEMO_SERVE ?= 1
PORT ?= 8000
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
		echo "No installed model: training LA-DNN on covid-ct (two ensemble members on the CPU: 15-30 min, depending on the machine)"; \
		$(BIN)/chestdx train --config configs/ladnn_covidct.yaml --run-dir $(DEMO_RUN) --install --no-evaluate $(DEMO_ARGS); \
	fi
	$(BIN)/chestdx evaluate --out $(DEMO_RUN)/report
	@echo "Report: $(DEMO_RUN)/report/report.html"
	$(BIN)/chestdx explain --dataset covid-ct --limit 4 --target covid --target lesions --out $(DEMO_RUN)/explain
	@echo "Heat maps: $(DEMO_RUN)/explain/gallery.html"
	@if [ "$(DEMO_SERVE)" = "1" ]; then \
		echo "Starting the service at http://127.0.0.1:$(PORT)/ (Ctrl-C to stop)"; \
		$(BIN)/chestdx serve --models "$(CHESTDX_HOME)/models" --port $(PORT); \
	fi

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/reproduce_ladnn.py --jpeg-check
	$(BIN)/python benchmarks/explain_quality.py
	$(BIN)/python benchmarks/inference_speed.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf runs .pytest_cache
