# One command sets up and runs the demo, one sets up and passes the tests (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
REDIS_PORT ?= 6379

.PHONY: install test demo redis browser compose docs lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[ml,bots,test]"
	touch $@

install: $(VENV)/.installed

# Start a local Redis for the queue tests when one is installed and not answering.
redis:
	@if command -v redis-cli >/dev/null 2>&1 && redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1; then \
		echo "redis: answering on $(REDIS_PORT)"; \
	elif command -v redis-server >/dev/null 2>&1; then \
		mkdir -p /tmp/convo-redis; \
		redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save "" --appendonly no \
			--dir /tmp/convo-redis --logfile /tmp/convo-redis/redis.log && \
		for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.5; done; \
		echo "redis: started on $(REDIS_PORT)"; \
	else \
		echo "redis: no redis-server installed; queue tests will skip unless CONVO_REQUIRE_REDIS=1"; \
	fi

# Headless Chromium renders the HTML eval report in one test; installed from Debian's packages when we are root.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "browser: chromium present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		&& echo "browser: installed chromium" || echo "browser: could not install chromium; the report test will skip"; \
	else echo "browser: no chromium (apt-get install chromium); the report test will skip"; fi

# tests/test_deploy.py also runs `docker-compose config -q` (Debian's docker-compose) when it is installed; the
# schema check against the Compose specification runs either way (jsonschema, from the test extra).
compose:
	@if command -v docker-compose >/dev/null 2>&1; then echo "compose: docker-compose present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
		&& echo "compose: installed docker-compose" || echo "compose: could not install docker-compose; that check will skip"; \
	else echo "compose: no docker-compose (apt-get install docker-compose); that check will skip"; fi

test: install redis browser compose
	$(BIN)/python -m pytest -q

# Regenerate docs/configuration.md and .env.example from config/settings.py (a test fails while they are stale).
docs: install
	$(BIN)/python -m config.reference

lint: install
	$(BIN)/ruff check .

# The whole loop offline (docs/demo.md); pass options with DEMO_ARGS="--base tiny --services-only ...".
demo: install
	$(BIN)/python bench/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
