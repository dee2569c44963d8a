"""Load local files or a hub dataset into normalised train/validation splits."""

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from medicalgpt.data.formats import detect_format
from medicalgpt.data.readers import find_data_files, iter_records
from medicalgpt.errors import DataError
from medicalgpt.privacy import DeidentifyingConverter

logger = logging.getLogger(__name__)
Converter = Callable[[object], dict]


@dataclass
class LoadReport:
    """How many records were read and skipped, with the first few problems for the log."""
    read: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < 5:
            self.problems.append(problem)


def iter_converted(located: Iterable[tuple[str, object]], convert: Converter, report: LoadReport,
                   skip_bad_records: bool, skip_flag: str | None = "--skip_bad_records"
                   ) -> Iterator[tuple[str, str, dict]]:
    """(location, detected format, converted record) for one source's records, one at a time.

    A bad record raises '<file>:<line>: <field>: ...' (naming skip_flag, the caller's flag that skips bad records,
    if it has one), or is counted in report and skipped.
    """
    file_format = None
    for location, raw in located:
        try:
            if isinstance(raw, DataError):
                raise raw
            kind = detect_format(raw)
            if file_format and kind != file_format:
                raise DataError(f"mixed formats in one file: a {kind} record in a {file_format} file")
            file_format = file_format or kind
            record = convert(raw)
            report.read += 1
        except DataError as e:
            if not skip_bad_records:
                hint = f"; fix the record, or pass {skip_flag} to skip bad records" if skip_flag else ""
                raise DataError(f"{location}: {e}{hint}") from None
            report.skip(f"{location}: {e}")
            continue
        yield location, kind, record


def convert_records(located: Iterable[tuple[str, object]], convert: Converter, report: LoadReport,
                    skip_bad_records: bool, skip_flag: str | None = "--skip_bad_records") -> list[dict]:
    """Convert one source's (location, raw record) pairs; a bad record raises '<file>:<line>: <field>: ...'."""
    return [record for _, _, record in iter_converted(located, convert, report, skip_bad_records, skip_flag)]


def _read_local(spec: str, convert: Converter, report: LoadReport, skip_bad_records: bool) -> list[dict]:
    return [record for path in find_data_files(spec)
            for record in convert_records(iter_records(path), convert, report, skip_bad_records)]


def _read_hub(data_args, convert: Converter, report: LoadReport) -> dict[str, list[dict]]:
    from datasets import load_dataset

    hub = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    return {split: convert_records(((f"{data_args.dataset_name}[{split} row {i}]", row)
                                    for i, row in enumerate(rows)), convert, report, data_args.skip_bad_records)
            for split, rows in hub.items()}


def _split_validation(train: list[dict], percentage: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded random percentage of the training records."""
    if percentage <= 0:
        return train, []
    count = max(1, round(len(train) * percentage / 100))
    if count >= len(train):
        raise DataError(f"--validation_split_percentage {percentage} of {len(train)} training records leaves "
                        "none to train on; lower it or pass --validation_file_dir")
    shuffled = Dataset.from_list(train).shuffle(seed=seed)
    return shuffled.select(range(count, len(train))).to_list(), shuffled.select(range(count)).to_list()


def _report(report: LoadReport) -> None:
    logger.info("Read %d records", report.read)
    if report.skipped:
        logger.warning("Skipped %d bad records (--skip_bad_records); first ones:\n  %s", report.skipped,
                       "\n  ".join(report.problems))


def load_splits(data_args, convert: Converter, seed: int = 42) -> DatasetDict:
    """Normalised 'train' and (when there is one) 'validation' splits from files or a hub dataset."""
    report = LoadReport()
    if data_args.deidentify:
        convert = DeidentifyingConverter(convert)
    if data_args.dataset_name:
        splits = _read_hub(data_args, convert, report)
        train, validation = splits.get("train", []), splits.get("validation", [])
    elif data_args.train_file_dir:
        train = _read_local(data_args.train_file_dir, convert, report, data_args.skip_bad_records)
        validation = (_read_local(data_args.validation_file_dir, convert, report, data_args.skip_bad_records)
                      if data_args.validation_file_dir else [])
    else:
        raise DataError("no training data: pass --train_file_dir (files or directories) or --dataset_name")
    _report(report)
    if data_args.deidentify:
        logger.info("De-identified (--deidentify): %s", convert.summary())
    if not train:
        raise DataError(f"the training set is empty ({report.skipped} records skipped as bad)")
    if not validation:
        train, validation = _split_validation(train, data_args.validation_split_percentage, seed)
    splits = {"train": train[: data_args.max_train_samples], "validation": validation[: data_args.max_eval_samples]}
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items() if rows})
