# Entry points (see README): `make lab` (the workbench in JupyterLab), `make demo`
# (the same reconstruction headless), `make test`, and `make voila` (the workbench
# as a standalone page). All set up a virtual environment in .venv on first use.
# torch is installed first and pinned: on the project machines pip takes the CPU
# build of torch 2.13.0 from local disk, while an unpinned torch may pull a
# multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo
# Extra server options, e.g. make lab LAB_ARGS="--no-browser --ip=0.0.0.0 --port=8888"
LAB_ARGS ?=
VOILA_ARGS ?=

.PHONY: install demo test lint format clean lab voila dataset chromium recorded-runs

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,lab]'
	# plotly's widget module as a file the Jupyter server serves: the browser evaluates it once per
	# page instead of once per figure (widgets/_plotly_module.py)
	$(BIN)/python -m cryospin_lab.widgets._plotly_module
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cryospin-lab demo --out $(DEMO_OUT)

# The embedded default data set, simulated once (~30 s) into the cache, so that the
# workbench starts at once.
dataset: $(STAMP)
	$(BIN)/python -c "from cryospin_lab import datasets; print('default data set:', datasets.hsp90().out_dir)"

# Two finished runs of the default set, switched after epoch 10 and after epoch 25, recorded once
# (about 12 minutes on 2 cores) into the cache, each epoch's maps kept compactly (~30 MB a run), to
# replay without training:
# cryospin_lab.widgets.replay(RUN_A, RUN_B) (README, "Replay").
RECORDED ?= $(or $(CRYOSPIN_LAB_CACHE),$(HOME)/.cache/cryospin-lab)/recorded
recorded-runs: dataset
	@set -e; data=$$($(BIN)/python -c "from cryospin_lab import datasets; print(datasets.hsp90().out_dir)"); \
	for s in 10 25; do \
	  if [ -f $(RECORDED)/hsp90_switch$$s/map.mrc ]; then echo "recorded: $(RECORDED)/hsp90_switch$$s"; continue; fi; \
	  $(BIN)/cryospin-lab reconstruct $$data/particles.star --ground-truth $$data/ground_truth.mrc \
	    --switch $$s --out $(RECORDED)/hsp90_switch$$s; \
	  $(BIN)/cryospin-lab compact $(RECORDED)/hsp90_switch$$s; \
	done

# JupyterLab on the workbench notebook; the server prints the URL to open. As root (a
# container), Jupyter refuses to start without --allow-root.
lab: dataset
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/workbench.ipynb

# The workbench alone as a web page (Voila runs the notebook and hides its code).
voila: dataset
	$(BIN)/voila $(VOILA_ARGS) notebooks/workbench.ipynb

# The browser test (tests/widgets/test_browser.py) drives Debian's Chromium: installed here with apt-get if
# missing (as root, else with sudo); never a browser download. Without it the test is skipped (-ra
# lists it).
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium; \
	  else echo "warning: /usr/bin/chromium is missing and apt-get needs root: the browser test will be skipped" >&2; fi; }

# Two test processes (pytest-xdist), one test file each at a time: most of the long tests wait on
# subprocesses, servers or a browser, so two of them share two cores well (about 9 minutes here,
# 12.5 in one process). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info
