"""Load local files or a hub dataset into normalised train/validation splits."""

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.arrow_writer import SchemaInferenceError
from datasets.exceptions import DatasetGenerationError

from medicalgpt.data.formats import detect_format
from medicalgpt.data.readers import find_data_files, iter_records
from medicalgpt.errors import DataError
from medicalgpt.privacy import DeidentifyingConverter, phi_summary

logger = logging.getLogger(__name__)
Converter = Callable[[object], dict]


@dataclass
class LoadReport:
    """How many records were read and skipped, with the first few problems for the log; --deidentify's counts."""
    read: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    deidentified: dict[str, int] = field(default_factory=dict)
    generated: bool = False  # the records were read in this run, not found in the cache

    def skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < 5:
            self.problems.append(problem)

    def add(self, other: "LoadReport") -> None:
        self.read += other.read
        self.skipped += other.skipped
        self.problems = (self.problems + other.problems)[:5]
        self.deidentified = dict(Counter(self.deidentified) + Counter(other.deidentified))


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


def _generate(sources: list, convert: Converter, report: LoadReport, skip_bad_records: bool,
              streaming: bool) -> Iterator[dict]:
    """Converted records of each source: a local file, or (name, split, rows) of a hub dataset.

    datasets calls this once per source (a list in gen_kwargs is a list of shards) and writes what it yields to Arrow
    in batches, so memory holds a batch of records, not the dataset. A stream has no end to report skips at: they
    are logged after each source.
    """
    for source in sources:
        if isinstance(source, Path):
            located, where = iter_records(source), source
        else:
            name, split, rows = source
            located, where = ((f"{name}[{split} row {i}]", row) for i, row in enumerate(rows)), f"{name}[{split}]"
        skipped = report.skipped
        yield from (record for _, _, record in iter_converted(located, convert, report, skip_bad_records))
        if streaming and report.skipped > skipped:
            logger.warning("Skipped %d bad records of %s (--skip_bad_records); %d so far, the first ones:\n  %s",
                           report.skipped - skipped, where, report.skipped, "\n  ".join(report.problems))
    report.generated = True


# The code that turns files into records: a change to it must not reuse records an older version wrote.
CODE = [Path(__file__).with_name(name) for name in ("loading.py", "readers.py", "formats.py")] + [
    Path(__file__).parents[1] / "privacy.py"]


def source_fingerprint(sources: list, convert: Converter, skip_bad_records: bool) -> str:
    """What the records depend on: each file's path, size and modification time (or a hub split's own fingerprint),
    the converter, --skip_bad_records and the reading code. Equal fingerprints reuse the Arrow cache."""
    from datasets.fingerprint import Hasher

    def identity(source) -> object:
        if isinstance(source, Path):
            stat = source.stat()
            return str(source.resolve()), stat.st_size, stat.st_mtime_ns
        return source[0], source[1], source[2]._fingerprint

    base = getattr(convert, "convert", convert)  # DeidentifyingConverter wraps a converter
    return Hasher.hash([[identity(s) for s in sources], Hasher.hash(base), type(convert).__name__, skip_bad_records,
                        [path.read_bytes() for path in CODE]])


def _report_file(dataset: Dataset) -> Path:
    return Path(dataset.cache_files[0]["filename"]).with_name("medicalgpt-load-report.json")


def read_records(sources: list, convert: Converter, report: LoadReport, skip_bad_records: bool,
                 streaming: bool = False) -> Dataset | IterableDataset | None:
    """The sources' converted records as an Arrow dataset cached by source_fingerprint (None when there are none),
    or with streaming, an IterableDataset that reads them as it is iterated.

    The first bad record raises '<file>:<line>: ...' (or is skipped and counted in report); on a cache hit, report
    gets the counts the run that wrote the cache recorded.
    """
    if not sources:
        return None
    gen_kwargs = dict(sources=sources, convert=convert, report=report, skip_bad_records=skip_bad_records,
                      streaming=streaming)
    if streaming:
        return IterableDataset.from_generator(_generate, gen_kwargs=gen_kwargs)
    try:
        dataset = Dataset.from_generator(_generate, gen_kwargs=gen_kwargs,
                                         fingerprint=source_fingerprint(sources, convert, skip_bad_records))
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        if isinstance(e.__cause__, SchemaInferenceError):  # not one record to infer columns from
            return None
        raise
    if report.generated:
        report.deidentified = dict(getattr(convert, "counts", {}))
        _report_file(dataset).write_text(json.dumps(asdict(report)))
    else:  # a run killed between writing the records and their report leaves counts it cannot know
        recorded = _report_file(dataset)
        cached = json.loads(recorded.read_text()) if recorded.exists() else {"read": len(dataset)}
        for key, value in cached.items():
            setattr(report, key, value)
        logger.info("Reusing the records read before from the same files (cache: %s)",
                    Path(dataset.cache_files[0]["filename"]).parent)
    return dataset


def _sources(data_args, split: str, streaming: bool) -> list:
    """The local files of --train_file_dir / --validation_file_dir, or a hub dataset's split."""
    if data_args.dataset_name:
        from datasets import load_dataset

        hub = load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=None, streaming=streaming)
        return [(data_args.dataset_name, split, hub[split])] if split in hub else []
    spec = data_args.train_file_dir if split == "train" else data_args.validation_file_dir
    return find_data_files(spec) if spec else []


# Records a stream is shuffled within (--streaming): about as many conversations in memory.
STREAM_SHUFFLE_BUFFER = 10_000

# At most this many records are held out automatically: a bigger validation set costs evaluation time for no
# better an estimate (1% of 2.4M records would be 24k conversations evaluated at every --eval_steps).
MAX_AUTO_VALIDATION = 2000


def split_validation(train: Dataset, percentage: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out a seeded random percentage of the training records, at most MAX_AUTO_VALIDATION of them."""
    if percentage <= 0:
        return train, None
    wanted = max(1, round(len(train) * percentage / 100))
    if wanted >= len(train):
        raise DataError(f"--validation_split_percentage {percentage} of {len(train)} training records leaves "
                        "none to train on; lower it or pass --validation_file_dir")
    count = min(wanted, MAX_AUTO_VALIDATION)
    capped = f", capped at {MAX_AUTO_VALIDATION} (pass --validation_file_dir for more)" if count < wanted else ""
    logger.info("Held out %d of %d training records for validation (--validation_split_percentage %g%s)", count,
                len(train), percentage, capped)
    shuffled = train.shuffle(seed=seed)
    return shuffled.select(range(count, len(train))), shuffled.select(range(count))


def _report(report: LoadReport) -> None:
    logger.info("Read %d records", report.read)
    if report.skipped:
        logger.warning("Skipped %d bad records (--skip_bad_records); first ones:\n  %s", report.skipped,
                       "\n  ".join(report.problems))


def _first(dataset, count: int | None):
    """The first count records (all with None), of a dataset or a stream."""
    if count is None:
        return dataset
    return dataset.take(count) if isinstance(dataset, IterableDataset) else dataset.select(range(min(count,
                                                                                                    len(dataset))))


def load_splits(data_args, convert: Converter, seed: int = 42) -> DatasetDict | IterableDatasetDict:
    """Normalised 'train' and (when there is one) 'validation' splits from files or a hub dataset.

    Records are read once into an Arrow cache (see read_records); with data_args.streaming, they are read as
    training iterates over them, and no validation split is carved from the training stream.
    """
    streaming = getattr(data_args, "streaming", False)
    if not (data_args.dataset_name or data_args.train_file_dir):
        raise DataError("no training data: pass --train_file_dir (files or directories) or --dataset_name")
    report, splits = LoadReport(), {}
    for split in ("train", "validation"):
        split_report = LoadReport()
        split_convert = DeidentifyingConverter(convert) if data_args.deidentify else convert
        splits[split] = read_records(_sources(data_args, split, streaming), split_convert, split_report,
                                     data_args.skip_bad_records, streaming)
        report.add(split_report)
    train, validation = splits["train"], splits["validation"]
    if streaming:
        train = train.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)  # files in a shuffled order, too
        if validation is None:
            logger.warning("--streaming: no validation split is held out of the training stream; pass "
                           "--validation_file_dir to evaluate")
    else:
        _report(report)
        if data_args.deidentify:
            logger.info("De-identified (--deidentify): %s", phi_summary(report.deidentified))
        if train is None:
            raise DataError(f"the training set is empty ({report.skipped} records skipped as bad)")
        if validation is None:
            train, validation = split_validation(train, data_args.validation_split_percentage, seed)
    splits = {"train": _first(train, data_args.max_train_samples),
              "validation": None if validation is None else _first(validation, data_args.max_eval_samples)}
    kept = {name: split for name, split in splits.items() if split is not None}
    return IterableDatasetDict(kept) if streaming else DatasetDict(kept)
