# Two commands on a fresh machine:  make demo  (the main job)   make test  (the test suite)
# Both build .venv once from the pinned files in requirements/ and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rko-installed
REQS := requirements/runtime.txt requirements/training.txt requirements/test.txt requirements/ros-pypi.txt
PYTEST_ARGS ?=
# Each demo run gets its own folder, so `make demo` can be run again without clearing anything.
DEMO_ARGS ?= --out demo_out/run-$(shell date +%Y%m%d-%H%M%S)

# With a sourced ROS 2 install (ROS_DISTRO set) the venv sees the system rclpy and skips the PyPI wheels.
ifdef ROS_DISTRO
VENV_FLAGS := --system-site-packages
ROS_REQS :=
else
VENV_FLAGS :=
ROS_REQS := -r requirements/ros-pypi.txt
endif

.PHONY: venv demo test bench clean-venv gpu

venv: $(STAMP)

$(STAMP): $(REQS) setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
	    -r requirements/runtime.txt -r requirements/training.txt -r requirements/test.txt $(ROS_REQS)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rko demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q test $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/rko bench inference --preset small --json

gpu: $(STAMP)
	$(PY) -m pip uninstall -y onnxruntime
	$(PY) -m pip install -r requirements/gpu.txt

clean-venv:
	rm -rf $(VENV)
