"""The README's generated sections match the code."""

from pathlib import Path

from medicalgpt.args import flag_reference_markdown


def test_readme_flag_reference_is_current():
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- flags:start -->\n", 1)[1].split("<!-- flags:end -->", 1)[0]
    assert block.strip() == flag_reference_markdown().strip(), "regenerate with: python -m medicalgpt.args"
