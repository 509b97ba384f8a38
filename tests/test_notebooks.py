"""Structural checks of the chapters (fast, nothing executed; nbval executes them).

Every notebook in notebooks/: valid JSON and a valid notebook named NN_title.ipynb, the
canonical set-up cell first, stored executed without errors, at least three cells checked by
nbval, at least three exercises with solutions, and listed (uncommented) in _toc.yml.
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))

SETUP_CELL = '''# Set-up, identical in every chapter (a test checks this).
# On Colab, install lionedu; Colab's own torch and triton are kept as they are.
# Without a CUDA GPU, Triton kernels run through Triton's CPU interpreter: that switch
# must be made before anything imports triton.
import os, subprocess, sys
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "lionedu @ git+https://github.com/lionedu/lionedu@v0.1.0"], check=True)
import torch
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import lionedu
print(lionedu.environment())'''


def _cells(path, kind):
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == kind]


def _source(cell):
    return "".join(cell["source"])


def test_there_are_chapters():
    assert CHAPTERS, "no chapter notebooks found"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_valid_notebook(path):
    nb = json.loads(path.read_text())  # raises on invalid JSON
    assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem), f"{path.name}: chapters are named NN_title.ipynb"
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.from_dict(nb))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_setup_cell(path):
    first = _cells(path, "code")[0]
    assert _source(first).strip() == SETUP_CELL


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_stored_executed_without_errors(path):
    for cell in _cells(path, "code"):
        if not _source(cell).strip():
            continue
        assert cell["execution_count"] is not None, f"never executed: {_source(cell)[:80]!r}"
        assert all(o["output_type"] != "error" for o in cell["outputs"]), f"error output in {_source(cell)[:80]!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_verified_cells_and_exercises(path):
    checked = [c for c in _cells(path, "code") if _source(c).lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
    assert len(checked) >= 3, f"{len(checked)} cells marked # NBVAL_CHECK_OUTPUT"
    markdown = "\n".join(_source(c) for c in _cells(path, "markdown"))
    assert len(re.findall(r"\{exercise\}", markdown)) >= 3
    assert len(re.findall(r"\{solution\}", markdown)) >= 3


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_listed_in_the_table_of_contents(path):
    toc = [line.split("#")[0] for line in (ROOT / "_toc.yml").read_text().splitlines()]
    assert any(f"notebooks/{path.stem}" in line for line in toc), f"{path.stem} is not in _toc.yml"


def test_vector_macros_are_defined():
    """Every bold-vector macro (``\\vq``, ``\\vw``, ...) that the chapters' text and the book's
    pages use is defined in _config.yml's MathJax macros: MathJax renders an undefined one as
    an error in the page, and the book's build does not notice."""
    config = (ROOT / "_config.yml").read_text()
    defined = set(re.findall(r"^\s+(v[a-z]):", config.split("macros:", 1)[1], re.M))
    texts = [_source(c) for path in CHAPTERS for c in _cells(path, "markdown")]
    texts += [page.read_text() for page in sorted((ROOT / "book").glob("*.md"))]
    used = {name for text in texts for name in re.findall(r"\\(v[a-z])(?![a-zA-Z])", text)}
    assert used and used <= defined, sorted(used - defined)
