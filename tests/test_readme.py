"""The README's Python examples run as written (they are documentation that must not rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """Every ```python fenced block, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_quick_start_and_a_pass_example():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "## Writing a pass" in text
    assert len(python_blocks(text)) >= 4


def test_readme_python_blocks_run_in_order(capsys):
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block so a failure points at the doc
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{block}") from e
    out = capsys.readouterr().out
    assert "pass 'approximate-gelu' must run after 'fuse', but 'fuse' comes later in the list" in out
