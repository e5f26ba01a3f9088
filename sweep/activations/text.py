"""Text for harvesting: documents from a dataset, tokenised into fixed-length contexts.

Datasets are a local ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file
(one JSON object per line, text in ``text_field``), a ``.parquet`` file (column
``text_field``), a folder written by ``datasets.Dataset.save_to_disk``, or a Hugging Face
dataset name (streamed; needs the hub or a local cache).

The token stream is every document's tokens followed by the separator (EOS), concatenated
in dataset order. Context ``i`` holds stream tokens ``[i*body, (i+1)*body)`` where
``body = context - 1`` when a BOS token is prepended to each context, else ``context``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sweep.errors import SweepError, first_line

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_DOC_BATCH = 256  # documents tokenised per tokenizer call


def is_local(dataset: str) -> bool:
    """Whether ``dataset`` names a local file or folder (rather than a hub dataset)."""
    p = Path(dataset).expanduser()
    return p.exists() or dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith((".", "/", "~"))


def iter_documents(dataset: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents (strings) of ``dataset`` in order; raises SweepError naming the problem."""
    path = Path(dataset).expanduser()
    if is_local(dataset) and not path.exists():
        raise SweepError(
            f"dataset {dataset} does not exist; pass an existing .txt/.jsonl/.json/.parquet file, a saved dataset folder or a hub name"
        )
    if path.is_dir():
        return _iter_saved(path, split, text_field)
    if path.is_file():
        if path.suffix == ".txt":
            return _iter_txt(path)
        if path.suffix == ".json" and _first_char(path) == "[":
            return _iter_json_array(path, text_field)
        if path.suffix in (".jsonl", ".json"):
            return _iter_jsonl(path, text_field)
        if path.suffix == ".parquet":
            return _iter_parquet(path, text_field)
        raise SweepError(
            f"dataset file {path} has an unknown type; use .txt, .jsonl, .json (lines, or one array) or .parquet"
        )
    return _iter_hub(dataset, split, text_field)


def _iter_txt(path: Path) -> Iterator[str]:
    """Documents of a text file: runs of lines separated by blank lines."""
    doc: list[str] = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                doc.append(line)
            elif doc:
                yield "".join(doc).rstrip("\n")
                doc = []
    if doc:
        yield "".join(doc).rstrip("\n")


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SweepError(
                    f"line {n} of {path} is not valid JSON ({err.msg}); fix the file"
                ) from err
            if not isinstance(obj, dict) or field not in obj:
                raise SweepError(
                    f"line {n} of {path} has no field '{field}'; set text_field to the text's key"
                )
            if (doc := _document(obj[field], f"line {n} of {path}", field)) is not None:
                yield doc


def _first_char(path: Path) -> str:
    """The first character of the file that is not white space ('' for none)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # (a BOM is no text)
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def _iter_json_array(path: Path, field: str) -> Iterator[str]:
    """Documents of a ``.json`` file holding one array of records (read whole: a large
    corpus belongs in JSON Lines, one record per line, which is streamed)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise SweepError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file"
        ) from err
    for n, obj in enumerate(records):
        if not isinstance(obj, dict) or field not in obj:
            raise SweepError(
                f"record {n} of {path} has no field '{field}'; set text_field to the text's key"
            )
        if (doc := _document(obj[field], f"record {n} of {path}", field)) is not None:
            yield doc


def _document(value: object, where: str, field: str) -> str | None:
    """A record's text: a string as it is, None (a null: no document) skipped, anything else
    refused (a list or number made into text would be harvested as its printed form)."""
    if value is None or isinstance(value, str):
        return value
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise SweepError(
        f"{where}: '{field}' holds a {type(value).__name__} ({shown}), not text; set "
        "text_field to the field holding the text"
    )


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise SweepError(f"dataset {path} is not a readable parquet file ({err})") from err
    if field not in pf.schema_arrow.names:
        raise SweepError(
            f"{path} has no column '{field}' (columns: {', '.join(pf.schema_arrow.names)}); set text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if (doc := _document(value, f"row {row} of {path}", field)) is not None:
                yield doc


def _iter_rows(rows: Iterable[dict], field: str, name: str) -> Iterator[str]:
    for n, row in enumerate(rows, 1):
        if field not in row:
            raise SweepError(
                f"dataset {name} has no field '{field}' (fields: {', '.join(row)}); set text_field"
            )
        if (doc := _document(row[field], f"row {n} of dataset {name}", field)) is not None:
            yield doc


def _iter_saved(path: Path, split: str, field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise SweepError(
            f"dataset folder {path} was not written by datasets' save_to_disk ({err})"
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SweepError(
                f"dataset {path} has no split '{split}' (splits: {', '.join(ds)}); set split"
            )
        ds = ds[split]
    return _iter_rows(ds, field, str(path))


def _iter_hub(name: str, split: str, field: str) -> Iterator[str]:
    import datasets

    from sweep.activations.lm import quiet_hub

    try:
        with quiet_hub():
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # hub, network and format errors all mean "cannot read it"
        first = first_line(err) or type(err).__name__
        raise SweepError(
            f"cannot load dataset '{name}' ({first}); pass a local .txt/.jsonl/.parquet file or check the name"
        ) from err
    return _iter_rows(ds, field, name)


@dataclass(frozen=True)
class Special:
    """Special token ids used to build contexts (from the model's tokenizer)."""

    bos: int | None
    sep: int | None
    """Appended after each document (the tokenizer's EOS)."""

    @classmethod
    def of(cls, tokenizer: object) -> Special:
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        return cls(bos=bos if bos is not None else eos, sep=eos if eos is not None else bos)


class NotEnoughText(SweepError):
    """The dataset ran out before the requested number of contexts."""

    def __init__(self, available_tokens: int, needed_tokens: int) -> None:
        super().__init__(f"dataset has {available_tokens} tokens, {needed_tokens} needed")
        self.available_tokens, self.needed_tokens = available_tokens, needed_tokens


def token_contexts(
    docs: Iterable[str], tokenizer: object, n_contexts: int, context: int, prepend_bos: bool
) -> np.ndarray:
    """The first ``n_contexts`` contexts of the token stream: (n_contexts, context) int32.

    Tokenises only as many documents as needed. Raises :class:`NotEnoughText` (with the
    stream's total length) when the dataset is shorter.
    """
    special = Special.of(tokenizer)
    if prepend_bos and special.bos is None:
        raise SweepError("the model's tokenizer has no BOS or EOS token; set prepend_bos=false")
    body = context - int(prepend_bos)
    need = n_contexts * body
    parts, have = [], 0
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _DOC_BATCH:
            have += _append_tokens(parts, batch, tokenizer, special)
            batch = []
            if have >= need:
                break
    if batch and have < need:
        have += _append_tokens(parts, batch, tokenizer, special)
    if have < need:
        raise NotEnoughText(have, need)
    stream = np.concatenate(parts)[:need].reshape(n_contexts, body)  # (N*body,) -> (N, body)
    if prepend_bos:
        bos = np.full((n_contexts, 1), special.bos, dtype=np.int32)
        stream = np.concatenate([bos, stream], axis=1)  # (N, body) -> (N, context)
    return np.ascontiguousarray(stream, dtype=np.int32)


def _append_tokens(
    parts: list[np.ndarray], docs: list[str], tokenizer: object, special: Special
) -> int:
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
    added = 0
    for seq in ids:
        if not seq:
            continue
        arr = np.asarray(seq + ([special.sep] if special.sep is not None else []), dtype=np.int32)
        parts.append(arr)
        added += len(arr)
    return added
