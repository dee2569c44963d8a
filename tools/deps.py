"""The locked dependency set: write it, compare against it, and derive the ranges from it.

    python tools/deps.py freeze requirements.lock       # the running venv's exact set -> the lock (make lock)
    python tools/deps.py caps requirements.txt requirements.lock   # upper bounds := the locked versions
    python tools/deps.py relax requirements.txt         # the ranges with caps lifted to the next major (test-latest)
    python tools/deps.py diff requirements.lock         # what the running venv has that differs from the lock

relax, caps and diff need only the standard library, so they run in a venv where nothing is installed yet.
"""

import argparse
import platform
import re
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

# name, then the version specifiers, then an optional comment: "transformers>=5.20,<=5.25.0  # why"
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<specs>[^#]*?)(?P<comment>\s*#.*)?$")
CAP = re.compile(r"<=\s*([0-9][^,\s]*)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, str]:
    """Package -> exact version, from a lock of name==version lines."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """Package -> version of every distribution in the running environment except the installers themselves.

    A local build label (torch 2.13.0+cpu) is dropped: the lock pins the release, and each machine takes the build
    that fits it (the CPU wheel, or PyPI's CUDA one).
    """
    skip = {"pip", "setuptools", "wheel"}
    return {normalise(dist.metadata["Name"]): dist.version.split("+")[0] for dist in metadata.distributions()
            if normalise(dist.metadata["Name"]) not in skip}


def minimum_python() -> str:
    """The oldest Python 3 minor version that every installed distribution's Requires-Python admits."""
    from packaging.specifiers import SpecifierSet  # installed with the locked set (transformers needs it)
    from packaging.version import Version

    specifiers = [SpecifierSet(dist.metadata["Requires-Python"]) for dist in metadata.distributions()
                  if dist.metadata["Requires-Python"]]
    return next(f"3.{minor}" for minor in range(8, 30)
                if all(Version(f"3.{minor}.99") in spec for spec in specifiers))


def freeze(lock: Path) -> None:
    pins = installed()
    header = [
        "# The exact set the test suite passed on: every package, torch included. `make install` installs it.",
        f"# Written by `make lock` (tools/deps.py freeze) on {date.today().isoformat()}, CPython "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}; "
        f"needs Python >= {minimum_python()}.",
    ]
    lock.write_text("\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n")
    print(f"{lock}: {len(pins)} packages")


def set_caps(requirements: Path, lock: Path) -> None:
    """Each capped requirement's `<=` bound becomes its locked version: the newest release the suite passed on."""
    pins = read_lock(lock)
    lines = []
    for line in requirements.read_text().splitlines():
        match = REQUIREMENT.match(line)
        if match and CAP.search(match["specs"]):
            version = pins[normalise(match["name"])]
            line = match["name"] + CAP.sub(f"<={version}", match["specs"]) + (match["comment"] or "")
        lines.append(line)
    requirements.write_text("\n".join(lines) + "\n")


def relax(requirements: Path) -> str:
    """The requirements with each `<=X.Y.Z` cap widened to `<X+1` (`<1` for 0.x): the compatible range to try."""
    def next_major(cap: re.Match) -> str:
        return f"<{int(cap[1].split('.')[0]) + 1}"

    lines = []
    for line in requirements.read_text().splitlines():
        match = REQUIREMENT.match(line)
        lines.append(match["name"] + CAP.sub(next_major, match["specs"]) if match else line)
    return "\n".join(lines) + "\n"


def diff(lock: Path) -> list[str]:
    pins, present = read_lock(lock), installed()
    return [f"{name}: {pins.get(name, 'not locked')} -> {present.get(name, 'not installed')}"
            for name in sorted(set(pins) | set(present)) if pins.get(name) != present.get(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("freeze").add_argument("lock", type=Path)
    caps = commands.add_parser("caps")
    caps.add_argument("requirements", type=Path)
    caps.add_argument("lock", type=Path)
    commands.add_parser("relax").add_argument("requirements", type=Path)
    commands.add_parser("diff").add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.command == "freeze":
        freeze(args.lock)
    elif args.command == "caps":
        set_caps(args.requirements, args.lock)
    elif args.command == "relax":
        sys.stdout.write(relax(args.requirements))
    else:
        changed = diff(args.lock)
        print("\n  ".join([f"differences from {args.lock}:", *changed]) if changed else f"same versions as {args.lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
