"""Writing output files whole or not at all: what convert_dataset.py and deidentify_data.py share."""

import os
from collections.abc import Iterator
from pathlib import Path


def write_lines(lines: Iterator[str], output: Path) -> int:
    """Write to output.part and rename when complete, so a failed conversion leaves no half-written file."""
    partial = output.with_name(output.name + ".part")
    count = 0
    try:
        with partial.open("w", encoding="utf-8") as f:
            f.write("[\n" if output.suffix == ".json" else "")
            for line in lines:
                f.write((",\n" if count and output.suffix == ".json" else "") + line)
                f.write("" if output.suffix == ".json" else "\n")
                count += 1
            f.write("\n]\n" if output.suffix == ".json" else "")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return count
