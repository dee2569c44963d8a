"""The locked install: requirements.lock, requirements.txt's ranges and the Makefile agree, and tools/deps.py works."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
DEPS = [sys.executable, str(ROOT / "tools" / "deps.py")]
_spec = importlib.util.spec_from_file_location("deps", ROOT / "tools" / "deps.py")
deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deps)


def locked() -> dict[str, str]:
    return deps.read_lock(LOCK)


def requirements(name: str) -> list[Requirement]:
    return [Requirement(line.split("#")[0]) for line in (ROOT / name).read_text().splitlines()
            if line.split("#")[0].strip()]


def test_lock_pins_every_requirement_within_its_range_and_caps_are_the_locked_versions():
    pins = locked()
    assert "torch" in pins and "+" not in pins["torch"]  # the release, not a local build label
    for requirement in requirements("requirements.txt") + requirements("requirements-dev.txt"):
        version = pins[deps.normalise(requirement.name)]
        assert requirement.specifier.contains(version), (requirement, version)
        caps = [spec.version for spec in requirement.specifier if spec.operator == "<="]
        assert caps in ([], [version]), f"{requirement}: cap is not the locked {version} (python tools/deps.py caps)"


def test_relax_widens_each_cap_to_the_next_major_and_caps_sets_them_back(tmp_path):
    ranges = tmp_path / "requirements.txt"
    ranges.write_text("torch>=2.4\ntransformers>=5.20,<=5.25.0  # why\npeft>=0.21,<=0.21.2\n")
    relaxed = subprocess.run([*DEPS, "relax", str(ranges)], capture_output=True, text=True, check=True).stdout
    assert relaxed.splitlines() == ["torch>=2.4", "transformers>=5.20,<6", "peft>=0.21,<1"]

    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\ntorch==2.14.0\ntransformers==5.26.1\npeft==0.22.0\n")
    subprocess.run([*DEPS, "caps", str(ranges), str(lock)], check=True)
    assert ranges.read_text().splitlines() == ["torch>=2.4", "transformers>=5.20,<=5.26.1  # why",
                                               "peft>=0.21,<=0.22.0"]


def test_freeze_writes_the_running_venv_and_diff_finds_no_change(tmp_path):
    lock = tmp_path / "requirements.lock"
    subprocess.run([*DEPS, "freeze", str(lock)], check=True, capture_output=True)
    text = lock.read_text()
    assert re.search(r"needs Python >= 3\.\d+", text)
    assert re.search(r"^torch==\d+\.\d+\.\d+$", text, re.M) and re.search(r"^trl==", text, re.M)
    same = subprocess.run([*DEPS, "diff", str(lock)], capture_output=True, text=True, check=True).stdout
    assert same.strip() == f"same versions as {lock}"
    lock.write_text(re.sub(r"^trl==.*$", "trl==0.0.1", text, flags=re.M))
    changed = subprocess.run([*DEPS, "diff", str(lock)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^  trl: 0\.0\.1 -> \d", changed, re.M)


def test_docs_state_the_locked_versions():
    page = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    table = page.split("<!-- locked:start -->", 1)[1].split("<!-- locked:end -->", 1)[0]
    stated = dict(re.findall(r"^\| (\S+) \| (\S+) \|$", table, re.M)[1:])
    pins = locked()
    assert stated == {name: pins[name] for name in stated} and len(stated) >= 6


def test_make_install_takes_torch_and_the_rest_from_the_lock():
    plan = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"torch=={locked()['torch']}" in plan
    assert "-c requirements.lock -r requirements.txt -r requirements-dev.txt" in plan


def test_make_install_refuses_a_python_older_than_the_lock_needs_and_accepts_this_one(tmp_path):
    plan = subprocess.run(["make", "-n", "-B", "install", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    version_check = plan.split("\ntest -x ", 1)[0]  # the recipe's first command, before the venv is made
    assert "sys.version_info" in version_check
    assert subprocess.run(["bash", "-c", version_check]).returncode == 0
    old_python = tmp_path / "python3.10"
    old_python.write_text("#!/bin/sh\nexec python3 -c 'import sys; sys.exit(1)'\n")  # "not >= 3.11"
    old_python.chmod(0o755)
    result = subprocess.run(["make", "-B", "install", f"PYTHON={old_python}"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "error: the locked set needs Python >= 3.11" in result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds (from a copy, so the checkout gets no build/ or .egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT / "medicalgpt", work / "src" / "medicalgpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(work / "src")], check=True, capture_output=True, timeout=120)
    (built,) = (work / "dist").glob("medicalgpt-*.whl")
    return built


def test_the_package_builds_with_every_module_and_chat_template(wheel):
    """`pip install .` installs what the scripts import from medicalgpt/, the chat templates included."""
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("medicalgpt/")}
    expected = {path.relative_to(ROOT).as_posix() for path in (ROOT / "medicalgpt").rglob("*")
                if path.suffix in (".py", ".jinja")}
    assert "medicalgpt/chat_templates/chatml.jinja" in expected and not expected - packaged


def test_installed_outside_a_checkout_what_needs_its_data_names_the_fix(wheel, tmp_path):
    """The embedded default model and de-identification read the checkout's data/, which a wheel does not carry:
    installed alone, each stops with a UsageError that says to install from a checkout."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    probe = ("import sys, medicalgpt\n"
             "from medicalgpt.default_model import ensure_default_model\n"
             "from medicalgpt.errors import UsageError\n"
             "from medicalgpt.privacy import knowledge_terms\n"
             "print('package:', medicalgpt.__file__)\n"
             "for needs_data in (lambda: ensure_default_model(sys.argv[1]), knowledge_terms):\n"
             "    try:\n"
             "        needs_data()\n"
             "    except UsageError as error:\n"
             "        print('error:', error)\n")
    run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "model")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(site)}, check=True)
    lines = run.stdout.splitlines()
    assert f"package: {site / 'medicalgpt' / '__init__.py'}" in lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 2 and all("from a MedicalGPT checkout" in e and "pip install -e" in e for e in errors)
    assert "data/pretrain/train" in errors[0] and "data/knowledge.py" in errors[1]
