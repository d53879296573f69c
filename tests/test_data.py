"""Tests for lmref.data.pipeline and lmref.data.sources: every public function, bad input included. Real parts, no mocks."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import pytest

from lmref.data.pipeline import (
    CleanConfig,
    DataConfig,
    Document,
    FilterConfig,
    clean_documents,
    clean_text,
    deduplicate,
    filter_documents,
    load_documents,
    load_hf_dataset,
    load_prepared,
    load_stdlib_docstrings,
    load_text_files,
    pack_blocks,
    prepare_data,
    save_artifacts,
    split_documents,
    split_of,
    train_tokenizer,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "file list string value name type object error data line path time key module class "
    "text word code node user host port mode size queue stack lock event task thread"
).split()


def prose(seed: int, n_words: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def test_load_text_files_counts_and_replaces_undecodable_bytes(tmp_path):
    (tmp_path / "good.txt").write_text("plain UTF-8 text, caf\u00e9 included")
    (tmp_path / "bad.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("cp1252"))
    with pytest.warns(UserWarning, match="2 bytes that are not UTF-8"):
        docs, stats = load_text_files(tmp_path, encoding="utf-8")  # the strict path
    assert stats["undecodable_bytes"] == 2 and stats["files_with_undecodable_bytes"] == 1
    assert stats["undecodable_by_file"] == {str(tmp_path / "bad.txt"): 2}
    assert [d.source for d in docs] == [str(tmp_path / "bad.txt"), str(tmp_path / "good.txt")]
    assert docs[0].text == "caf\ufffd cr\ufffdme"
    assert docs[1].text == "plain UTF-8 text, caf\u00e9 included"  # valid multi-byte kept


@pytest.mark.parametrize("policy, expected", [("drop", ["caf crme"]), ("skip", [])])
def test_load_text_files_drop_and_skip_policies(tmp_path, policy, expected):
    (tmp_path / "bad.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("cp1252"))
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.warns(UserWarning):
        docs, stats = load_text_files(tmp_path, on_decode_error=policy, encoding="utf-8")
    assert [d.text for d in docs if "bad" in d.source] == expected
    assert stats["undecodable_bytes"] == 2
    assert stats["skipped_undecodable_files"] == (policy == "skip")


def test_load_text_files_raise_policy_names_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"abc \xff\xfe")
    with pytest.raises(UnicodeDecodeError, match="bad.txt"):
        load_text_files(tmp_path, on_decode_error="raise", encoding="utf-8")
    with pytest.raises(ValueError, match="on_decode_error"):
        load_text_files(tmp_path, on_decode_error="ignore")


def test_load_text_files_counts_empty_and_binary_files_and_splits(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.md").write_text("  \n\n ")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (tmp_path / "ignored.bin").write_bytes(b"some bytes")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.rst").write_text("first doc\n%%\nsecond doc\n%%\n")
    docs, stats = load_text_files(tmp_path, separator="\n%%\n")
    assert stats["files"] == 4 and stats["empty_files"] == 2 and stats["binary_files"] == 1
    assert [d.text for d in docs] == ["first doc", "second doc"]
    assert docs[1].source.endswith("two.rst#1")


def test_load_text_files_clear_errors_without_text(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="no text found.*1 empty"):
        load_text_files(tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no text found.*0 file"):
        load_text_files(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_files(tmp_path / "missing")


def test_shipped_messy_sample_shows_every_problem():
    with pytest.warns(UserWarning, match="not UTF-8"):
        _, strict = load_text_files(REPO / "data" / "messy", separator="\n%%\n", encoding="utf-8")
    assert strict["undecodable_bytes"] > 0
    docs, stats = load_text_files(REPO / "data" / "messy", separator="\n%%\n")
    assert stats["empty_files"] == 1 and stats["undecodable_bytes"] == 0
    assert stats["encodings"]["cp1252"] == 1 and "\ufffd" not in "".join(d.text for d in docs)
    cleaned, c = clean_documents(docs)
    assert c["control_chars_removed"] > 0 and c["doctest_lines_removed"] > 0
    assert c["rest_markup_replaced"] > 0 and c["unicode_normalized_docs"] > 0
    _, d = deduplicate(cleaned)
    assert d["exact_duplicates"] >= 1 and d["near_duplicates"] >= 1


@pytest.fixture(scope="module")
def stdlib_docs():
    return load_stdlib_docstrings()


def test_stdlib_docstrings_are_a_real_corpus(stdlib_docs):
    docs, stats = stdlib_docs
    assert stats["chars"] > 1_000_000 and stats["docs"] == len(docs) > 5000
    assert stats["source_modules"] > 100 and stats["compiled_modules"] > 10
    sources = {d.source for d in docs}
    assert "json.dumps" in sources and "math.sqrt" in sources and "builtins.len" in sources
    assert not any(
        s.startswith(("test.", "idlelib", "tkinter", "antigravity", "this.")) for s in sources
    )


def test_stdlib_docstrings_are_deterministic_and_never_import_side_effects():
    before = set(sys.modules)
    a, stats = load_stdlib_docstrings(["this", "antigravity", "json", "math", "turtle", "idlelib"])
    b, _ = load_stdlib_docstrings(["math", "json", "idlelib", "antigravity"])
    assert a == b and stats["modules_skipped"] == 4
    assert a[0].source == "json" and any(d.source == "math.sqrt" for d in a)
    # pure-Python modules are parsed, not imported
    assert {"this", "antigravity", "turtle"}.isdisjoint(set(sys.modules) - before)


def test_stdlib_docstrings_ignore_functions_injected_into_builtins(monkeypatch):
    import builtins

    def lmref_injected():
        """Injected by a notebook kernel, like IPython's get_ipython."""

    monkeypatch.setattr(builtins, "lmref_injected", lmref_injected, raising=False)
    docs, _ = load_stdlib_docstrings(["builtins", "_collections"])
    sources = {d.source for d in docs}
    assert "builtins.len" in sources and "_collections.deque.append" in sources
    assert "builtins.lmref_injected" not in sources


def test_load_documents_dispatches_and_hf_loader(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    docs, stats = load_documents(tmp_path)
    assert [d.text for d in docs] == ["line one\nline two\n"] and stats["files"] == 1
    docs, stats = load_documents("stdlib", modules=["json"])
    assert docs and all(d.source.startswith("json") for d in docs)
    # the `text` builder ships with datasets: works offline, one document a line
    docs, stats = load_hf_dataset("text", data_files=str(tmp_path / "a.txt"))
    assert [d.text for d in docs] == ["line one", "line two"] and stats["rows"] == 2
    with pytest.raises(ValueError, match="no column 'body'"):
        load_hf_dataset("text", data_files=str(tmp_path / "a.txt"), text_column="body")
    with pytest.raises(RuntimeError, match="could not load dataset"):
        load_documents("no-such-user/no-such-dataset-lmref")


# ---------------------------------------------------------------------------------------------
# cleaning
# ---------------------------------------------------------------------------------------------


def test_clean_text_unicode_forms():
    text = "\uff26\uff55\uff4c\uff4c width \ufb01le\u00a0x\u00b2 e\u0301"
    nfkc, counts = clean_text(text, CleanConfig(unicode_form="NFKC"))
    assert nfkc == "Full width file x2 \u00e9" and counts["unicode_normalized_docs"] == 1
    nfc, _ = clean_text(text, CleanConfig(unicode_form="NFC"))
    assert nfc.startswith("\uff26") and nfc.endswith("\u00e9")  # NFC composes, does not fold
    raw, counts = clean_text(text, CleanConfig(unicode_form=None, normalize_whitespace=False))
    assert raw == text and counts["unicode_normalized_docs"] == 0


def test_clean_text_control_chars_and_whitespace():
    text = "\ufeffa\x07b\u200bc\r\nline\t\ttwo   three   \n\n\n\n\nend  "
    out, counts = clean_text(text)
    assert out == "abc\nline two three\n\nend"
    assert counts["control_chars_removed"] == 3
    kept, _ = clean_text(text, CleanConfig(remove_control_chars=False, normalize_whitespace=False))
    assert "\x07" in kept and "\n\n\n" in kept


def test_clean_text_doctest_modes():
    text = "Add numbers.\n\n>>> add(1,\n...     2)\n3\n>>> add(2, 2)\n4\n\nThe end."
    dropped, counts = clean_text(text, CleanConfig(doctest="drop"))
    assert dropped == "Add numbers.\n\nThe end." and counts["doctest_lines_removed"] == 5
    prompts, counts = clean_text(text, CleanConfig(doctest="prompts"))
    assert ">>>" not in prompts and "add(1,\n    2)\n3" in prompts
    assert counts["doctest_lines_removed"] == 3
    kept, _ = clean_text(text, CleanConfig(doctest="keep"))
    assert ">>> add(2, 2)" in kept


def test_clean_text_rest_markup():
    text = (
        "See :func:`json.dumps`, :class:`~collections.OrderedDict`, "
        ":py:meth:`title <str.title>` and ``None``."
    )
    out, counts = clean_text(text)
    assert out == "See json.dumps, OrderedDict, title and None."
    assert counts["rest_markup_replaced"] == 4
    kept, _ = clean_text(text, CleanConfig(rest_markup=False))
    assert kept == text


def test_clean_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="unicode_form"):
        CleanConfig(unicode_form="NFX")
    with pytest.raises(ValueError, match="doctest"):
        CleanConfig(doctest="maybe")


def test_clean_documents_reports_and_drops_emptied_docs():
    docs = [Document("  hello\x07  world ", "a"), Document(">>> 1 + 1\n2", "b"), "already clean"]
    out, stats = clean_documents(docs)
    assert [d.text for d in out] == ["hello world", "already clean"]
    assert out[1].source == "doc[2]"  # plain strings get a position as source
    assert stats["docs_in"] == 3 and stats["docs_out"] == 2 and stats["removed_empty"] == 1
    assert stats["docs_changed"] == 2 and stats["chars_out"] < stats["chars_in"]


# ---------------------------------------------------------------------------------------------
# dedup, filters, split
# ---------------------------------------------------------------------------------------------


def test_deduplicate_exact_and_near_duplicates():
    base = prose(1, 80)
    words = base.split()
    near = " ".join(words[:40] + ["changed"] + words[41:])  # one word in 80 differs
    docs = [
        Document(base, "a"),
        Document("  " + base.replace(" ", "\n", 3), "a-copy"),
        Document(near, "a-near"),
        Document(prose(2, 80), "b"),
        Document(prose(3, 80), "c"),
    ]
    kept, stats = deduplicate(docs)
    assert [d.source for d in kept] == ["a", "b", "c"]
    assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] == 1
    assert stats["exact_examples"] == [("a", "a-copy")]
    assert stats["near_examples"] == [("a", "a-near")]
    kept, stats = deduplicate(docs, near=False)
    assert [d.source for d in kept] == ["a", "a-near", "b", "c"] and stats["near_duplicates"] == 0
    with pytest.raises(ValueError, match="threshold"):
        deduplicate(docs, threshold=0)


def test_deduplicate_keeps_short_distinct_docs():
    kept, stats = deduplicate(["Return self==value.", "Return the length.", "Return x."])
    assert len(kept) == 3 and stats["docs_out"] == 3


def test_filter_documents_reasons():
    good = prose(4, 30)
    docs = {
        "too_short": "Short.",
        "too_long": good * 200,
        "too_few_words": "a" * 30 + " " + "b" * 40,
        "symbol_ratio": "+----+----+ | a | b | +====+====+ | 1 | 2 | +----+----+ ---- ====",
        "alpha_word_ratio": "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 x",
        "replacement_chars": good.replace("e", "\ufffd"),
    }
    kept, stats = filter_documents([good, *docs.values()], FilterConfig())
    assert [d.text for d in kept] == [good]
    assert stats["removed"] == {reason: 1 for reason in docs}
    kept, stats = filter_documents(
        docs.values(), FilterConfig(min_chars=1, min_words=1, max_symbol_ratio=1.0)
    )
    assert stats["removed"]["too_long"] == 1 and "too_short" not in stats["removed"]


def test_split_is_stable_when_documents_are_added():
    docs = [prose(i, 20) for i in range(400)]
    first, stats = split_documents(docs, 0.1, 0.1)
    assert sum(stats["docs"].values()) == 400
    assert 20 <= stats["docs"]["test"] <= 60 and 20 <= stats["docs"]["validation"] <= 60
    more = docs[:200] + [prose(i, 20) for i in range(1000, 1300)] + docs[200:]
    random.Random(0).shuffle(more)
    second, _ = split_documents(more, 0.1, 0.1)
    for name in first:
        assert {d.text for d in first[name]} <= {d.text for d in second[name]}
    assert split_of(docs[0], 0.1, 0.1) == split_of(docs[0], 0.1, 0.1)
    assert split_of(docs[0], 0.1, 0.1, salt="other") in ("train", "validation", "test")
    with pytest.raises(ValueError, match="fractions"):
        split_documents(docs, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# tokenizer and packing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tokenizer():
    docs, _ = load_stdlib_docstrings(["json", "textwrap", "string", "math"])
    tokenizer, stats = train_tokenizer([d.text for d in docs], vocab_size=600)
    return tokenizer, stats


def test_train_tokenizer_round_trips_and_saves(small_tokenizer, tmp_path):
    tokenizer, stats = small_tokenizer
    assert stats["vocab_size"] == len(tokenizer) == 600 and stats["chars_per_token"] > 1.5
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in [
        "def f(x):\n    return x ** 2  # squared",
        "caf\u00e9 \u65e5\u672c \U0001f600 \ufffd",
        "  leading and trailing  ",
        "2024-07-14 12345",
        "a\tb\r\nc",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]  # digits one by one
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded("json dumps")["input_ids"] == tokenizer("json dumps")["input_ids"]
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="at least one text"):
        train_tokenizer([])


def test_pack_blocks_exact_lengths_zero_padding(small_tokenizer):
    tokenizer, _ = small_tokenizer
    texts = [prose(i, random.Random(i).randint(5, 120)) for i in range(50)]
    blocks, stats = pack_blocks(texts, tokenizer, block_size=32, batch_size=20)
    lengths = {len(ids) for ids in blocks["input_ids"]}
    assert lengths == {32} and stats["blocks"] == len(blocks) > 0
    flat = [t for ids in blocks["input_ids"] for t in ids]
    assert tokenizer.pad_token_id not in flat and stats["padding_tokens"] == 0
    expected = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + EOS after each doc
    assert stats["tokens"] == expected
    assert stats["tokens"] == stats["tokens_in_blocks"] + stats["dropped_tokens"]
    assert 0 <= stats["dropped_tokens"] < 32 * 3  # at most a partial block per map batch (3)
    # the stream is the documents joined by EOS, in order
    first = tokenizer(texts[0])["input_ids"] + [tokenizer.eos_token_id]
    assert flat[: len(first)] == first[: len(flat)]
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks(texts, tokenizer, block_size=1)


# ---------------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------------


def test_prepare_data_end_to_end_and_load_prepared(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(120):
        (corpus / f"{i:03d}.txt").write_text(prose(i, 80) + "\n\n>>> doctest()\n1\n")
    (corpus / "dup.txt").write_text(prose(0, 80))
    config = DataConfig(
        source=str(corpus), vocab_size=300, block_size=64, val_fraction=0.1, test_fraction=0.1
    )
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no undecodable bytes here: no warning either
        report = prepare_data(config, out_dir=out)
    assert report["source"]["docs"] == 121 and report["clean"]["doctest_lines_removed"] == 240
    assert report["dedup"]["exact_duplicates"] == 1 and report["dedup"]["docs_out"] == 120
    assert sum(report["split"]["docs"].values()) == report["filter"]["docs_out"]
    assert report["tokenizer"]["vocab_size"] == 300
    saved = json.loads((out / "report.json").read_text())
    assert saved["packing"]["train"]["blocks"] == report["packing"]["train"]["blocks"] > 0
    tokenizer, blocks = load_prepared(out)
    assert set(blocks) == {"train", "validation", "test"}
    assert {len(x) for x in blocks["train"]["input_ids"]} == {64}
    assert tokenizer.pad_token == "<|pad|>" and len(tokenizer) == 300
    with pytest.raises(FileNotFoundError, match="no prepared data"):
        load_prepared(tmp_path / "nowhere")


def test_save_artifacts_layout(tmp_path, small_tokenizer):
    from datasets import Dataset, DatasetDict

    tokenizer, _ = small_tokenizer
    corpus = DatasetDict({"train": Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]})})
    out = save_artifacts(tmp_path / "d", tokenizer, corpus, {"x": 1})
    assert sorted(p.name for p in out.iterdir()) == ["corpus", "report.json", "tokenizer"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------
# bad input: each failure says what happened and what to do
# ---------------------------------------------------------------------------------------------


def test_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*corpsu"):
        load_documents(tmp_path / "corpsu")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_documents(str(tmp_path / "corpsu"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="no such file or folder: data/mesy"):
        load_documents("data/mesy")  # "owner/name" in form, but data/ is a local folder
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_documents("notes.txt")


def small_corpus(folder: Path, n: int, words: int = 12) -> str:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.txt").write_text(prose(i, words))
    return str(folder)


def test_prepare_data_fails_on_a_split_without_one_block(tmp_path):
    config = DataConfig(
        source=small_corpus(tmp_path / "c", 60, words=6),
        vocab_size=300,
        block_size=256,
        val_fraction=0.1,
        test_fraction=0.1,
        filters=FilterConfig(min_chars=20, min_words=3),
    )
    with pytest.raises(
        ValueError,
        match=r"the (validation|test) split has \d+ tokens in \d+ "
        r"document\(s\), not enough for one block of block_size=256",
    ):
        prepare_data(config, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written for load_prepared to trip on


def test_pack_blocks_without_a_block_is_a_clear_error(small_tokenizer):
    tokenizer, _ = small_tokenizer
    with pytest.raises(ValueError, match=r"\d+ tokens make no block of block_size=512"):
        pack_blocks(["a few words"], tokenizer, block_size=512)


def test_corpus_emptied_by_the_filters_says_so(tmp_path):
    config = DataConfig(
        source=small_corpus(tmp_path / "c", 10),
        vocab_size=300,
        filters=FilterConfig(min_chars=10_000, max_chars=20_000),
    )
    with pytest.raises(
        ValueError,
        match=r"no document is left after filter .*too_short.*"
        r"relax DataConfig.filters",
    ):
        prepare_data(config, out_dir=tmp_path / "out")


def test_load_prepared_names_an_empty_split(tmp_path, small_tokenizer):
    from datasets import Dataset, DatasetDict

    tokenizer, _ = small_tokenizer
    blocks = Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]})
    save_artifacts(
        tmp_path, tokenizer, DatasetDict({"train": blocks, "test": blocks.select([])}), {}
    )
    with pytest.raises(ValueError, match=r"empty split\(s\) \['test'\]"):
        load_prepared(tmp_path)
