"""The README and docs/ match the code: the generated flag reference, the commands they quote, the error line shown."""

import importlib
import json
import re
import shlex
from functools import partial
from pathlib import Path

import pytest

from medicalgpt.args import flag_reference_markdown
from medicalgpt.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # every page a reader is sent to


def page_text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def test_flag_reference_page_is_current():
    block = page_text("docs/flags.md").split("<!-- flags:start -->\n", 1)[1].split("<!-- flags:end -->", 1)[0]
    assert block.strip() == flag_reference_markdown().strip(), "regenerate with: python -m medicalgpt.args"


def quoted_commands() -> list[list[str]]:
    """Each command in the bash blocks of every page, continuation lines joined, comments dropped, split into
    words."""
    commands = []
    blocks = [block for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text("utf-8"), re.S)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if words := shlex.split(line, comments=True):
                commands.append(words)
    return commands


def stage_of(wrapper: str) -> str:
    """The script a run_*.sh wrapper passes its extra arguments to (run_ppo.sh: its last one, PPO)."""
    return re.findall(r'"\$HERE/(\w+\.py)"', (ROOT / wrapper).read_text())[-1]


def help_text(script: str, capsys) -> str:
    """What `python <script> --help` (or `python -m medicalgpt.<module> --help`) prints (run in this process)."""
    with pytest.raises(SystemExit):
        importlib.import_module(script.removesuffix(".py")).main(["--help"])
    return capsys.readouterr().out


def test_every_quoted_command_names_an_existing_script_and_flags_it_accepts(capsys):
    checked = 0
    for words in quoted_commands():
        ours = [word for word in words if word.endswith((".py", ".sh")) and (ROOT / word).is_file()]
        if words[:2] == ["python", "-m"] and words[2].startswith("medicalgpt."):
            ours = [words[2]]
        if not ours:
            sets_variables = words[0] == "export" and all("=" in word for word in words[1:])
            installs = words[0] == "pip" or words[:3] == ["python3", "-m", "venv"]  # docs/install.md
            assert words[0] == "make" or installs or sets_variables, \
                f"a quoted command that is not checked: {' '.join(words)}"
            continue
        if ours[0] == "vllm_deployment.sh":  # its flags are vLLM's
            continue
        script = stage_of(ours[0]) if ours[0].startswith("run_") else ours[0]
        flags = [word.split("=")[0] for word in words[words.index(ours[0]) + 1:] if word.startswith("--")]
        text = help_text(script, capsys)
        missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", text)]
        assert not missing, f"{' '.join(words)}: {script} has no {', '.join(missing)}"
        checked += 1
    assert checked >= 35


def test_the_quoted_data_error_is_the_line_a_stage_prints(tmp_path, monkeypatch, capsys):
    import supervised_finetuning

    (quoted,) = [line for line in page_text("docs/data.md").splitlines() if line.startswith("error: ")]
    good = {"conversations": [{"from": "human", "value": "高血压用什么药？"}, {"from": "gpt", "value": "氨氯地平。"}]}
    bad = {"conversations": [{"from": "human", "value": "高血压用什么药？"}, {"from": "doctor", "value": "氨氯地平。"}]}
    (tmp_path / "data/sft/train").mkdir(parents=True)
    (tmp_path / "data/sft/train/x.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                             for r in (good, good, bad)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(partial(supervised_finetuning.main, ["--train_file_dir", "data/sft/train", "--output_dir", "out"]))
    err = capsys.readouterr().err  # the reading progress bar, then the error on one line
    assert exit_info.value.code == 2 and err.splitlines()[-1] == quoted and "Traceback" not in err


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = page_text("README.md")
    assert len(readme.splitlines()) <= 250
    unlinked = [page.name for page in PAGES[1:] if f"](docs/{page.name})" not in readme]
    assert not unlinked, f"docs pages the README's Documentation list does not link: {unlinked}"


def test_relative_links_point_at_files_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken
