# Two entry points (see README "Quick start"); each sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ART := artifacts/gemma3-270m-fp32

.PHONY: demo test test-fast lint clean image docker-check

$(BIN)/gemma-export: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# Export the bundled real Gemma 3 270M, verify parity, generate a few words.
demo: $(BIN)/gemma-export
	$(BIN)/gemma-export export --out $(ART) --force
	$(BIN)/gemma-export generate $(ART) "The capital of France is" --max-new-tokens 24

# The whole test suite: the fast tier first (a mistake fails in a minute), then the rest
# (artifact fixtures, the server, the real Gemma 3 270M and the three other runtimes).
test: test-fast
	$(BIN)/python -m pytest -q -ra -m "real or slow" -p no:cacheprovider

# The tier to run while working: tiny presets only, no real model, no slow checks.
test-fast: $(BIN)/gemma-export
	$(BIN)/python -m pytest -q -ra -m "not real and not slow" -p no:cacheprovider

lint: $(BIN)/gemma-export
	$(BIN)/ruff check gemma_export tests benchmarks scripts

# The deployment image (README "Deploy"): the server with an artifact baked in at /model.
# ARTIFACT=DIR bakes that artifact; none exports the bundled 270M at int8 (a few minutes).
# BASE=IMAGE overrides the Dockerfile's python slim base; BASE=debootstrap builds one without
# a registry (scripts/docker_base.sh) and installs wheels downloaded on the host (no index in
# the build: scripts/docker_wheels.sh), as CI does.
IMAGE ?= gemma-export:latest
IMAGE_ART := artifacts/image/model
image: $(BIN)/gemma-export
	@if [ -n "$(ARTIFACT)" ]; then \
		rm -rf $(IMAGE_ART) && mkdir -p artifacts/image && cp -a "$(ARTIFACT)" $(IMAGE_ART); \
	elif [ ! -f $(IMAGE_ART)/manifest.json ]; then \
		$(BIN)/gemma-export export --out artifacts/image/fp32 --no-verify --force && \
		$(BIN)/gemma-export quantize artifacts/image/fp32 --precision int8 --out $(IMAGE_ART) --no-verify --force && \
		rm -rf artifacts/image/fp32; \
	fi
	base="$(BASE)"; offline=0; \
	if [ "$$base" = debootstrap ]; then \
		base=$$(scripts/docker_base.sh) && scripts/docker_wheels.sh $$base $(BIN)/python && offline=1 || exit 1; \
	fi; \
	DOCKER_BUILDKIT=0 docker build --network host --target with-model -t $(IMAGE) \
		$${base:+--build-arg BASE=$$base} --build-arg PIP_OFFLINE=$$offline \
		--build-arg VERSION=$$($(BIN)/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])') \
		--build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || echo local) .
	docker image inspect -f '{{.Size}}' $(IMAGE) | awk '{ printf "$(IMAGE): %d MB\n", $$1 / 1e6 }'

# CI check of the image: build, run, call, SIGTERM, hadolint (scripts/docker_check.sh).
docker-check: $(BIN)/gemma-export
	bash scripts/docker_check.sh

clean:
	rm -rf $(VENV) artifacts .pytest_cache
