# Two entry points for a fresh clone (see README.md):
#   make book   set up .venv, then build the book, executing every chapter
#   make test   set up .venv, then run the whole test suite
# The scale comes from NEURONLIB_SCALE (quick, default, paper); the book defaults to
# "default", the tests always run at "quick".

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SCALE ?= $(or $(NEURONLIB_SCALE),default)
BOOK_OUT := _build/$(SCALE)
# Chapters execute from notebooks/, so a relative data path must become absolute.
ifneq ($(NEURONLIB_DATA),)
export NEURONLIB_DATA := $(abspath $(NEURONLIB_DATA))
endif
LIB_SOURCES := $(shell find neuronlib -name '*.py')

.PHONY: setup book test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "The pinned versions in constraints.txt need Python >= 3.11; run with PYTHON=python3.11 (or newer)."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[book,test]'
	touch $@

# Jupyter Book's execution cache sees notebook changes only; drop it when the
# library changes so that every figure comes from the current code.
$(BOOK_OUT)/.library-stamp: $(LIB_SOURCES)
	rm -rf $(BOOK_OUT)/_build/.jupyter_cache
	mkdir -p $(BOOK_OUT)
	touch $@

book: setup $(BOOK_OUT)/.library-stamp
	NEURONLIB_SCALE=$(SCALE) $(BIN)/jupyter-book build --all -W -n --keep-going \
		--path-output $(BOOK_OUT) .
	@echo "Open $(BOOK_OUT)/_build/html/index.html"

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf _build
