"""Every page under docs/ runs as written: its python blocks execute in order, in one namespace per page."""

from pathlib import Path

import pytest

from test_readme import python_blocks

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))


def test_every_capability_has_an_executed_page():
    assert {p.stem for p in DOCS} >= {"layers", "quantization", "sparsity", "export-and-saving", "command-line",
                                      "distributed"}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.stem)
def test_page_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pages write files (ONNX, saved models): keep them out of the checkout
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    blocks = python_blocks(page.read_text())
    assert blocks, f"{page.name} has no python example"
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page.name} block {i}", "exec"), namespace)
        except Exception as e:  # name the block so a failure points at the page
            raise AssertionError(f"{page.name} python block {i} failed: {type(e).__name__}: {e}\n{block}") from e
