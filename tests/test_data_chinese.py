"""Chinese end to end in the data pipeline: language, CJK punctuation, filters, near-dedup, corpus."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from lmref.data.corpora import FORTUNES_DIR, load_mix, load_zh_fortunes
from lmref.data.language import detect_languages, normalize_keeping_cjk_punctuation
from lmref.data.pipeline import (
    CleanConfig,
    DataConfig,
    Document,
    FilterConfig,
    chars_per_token,
    clean_documents,
    deduplicate,
    filter_documents,
    load_documents,
    prepare_data,
    texts_by_language,
)

pytestmark = pytest.mark.unit

# 77 characters, no space: one "word" for str.split().
ZH = (
    "数据准备是训练语言模型的第一步：先去掉重复和低质量的文本，再按语言统计数量！"
    "中文没有空格（词与词之间不分开），所以按字计数，标点也要保留，这样模型学得好。"
)
ZH_OTHER = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。这首诗写的是秋夜里游子思念家乡的心情，"
    "语言朴素自然，却流传了一千多年，几乎人人都会背诵？"
)
EN = "The tokenizer is trained on the training split only, so validation text stays unseen."
JA = "日本語の文章には単語の間に空白がないので、文字ごとに数える必要があります。"
FORTUNES = (FORTUNES_DIR / "tang300").is_file()


def test_chinese_paragraph_survives_cleaning_and_filtering_with_its_punctuation():
    assert len(ZH) == 77 and len(ZH.split()) == 1
    raw = ZH.replace("数据", "数\u200b据") + "\r\n"  # a zero-width space and a CRLF to clean
    cleaned, stats = clean_documents([Document(raw, "zh")])
    assert cleaned[0].text == ZH and stats["cjk_punctuation_kept"] == 8
    kept, stats = filter_documents(cleaned, FilterConfig())
    assert [d.text for d in kept] == [ZH] and stats["removed"] == {}
    # plain NFKC folds the punctuation into ASCII, as it did before
    folded, _ = clean_documents([raw], CleanConfig(cjk_punctuation="fold"))
    assert "：" not in folded[0].text and ":" in folded[0].text and "（" not in folded[0].text


def test_cjk_punctuation_mode_leaves_latin_text_as_nfkc_did():
    latin = "ＡＢＣ！ full-width letters, ﬁ ligature, x\u00a0y （not CJK）"
    text, kept = normalize_keeping_cjk_punctuation(latin)
    assert kept == 0 and text == "ABC! full-width letters, fi ligature, x y (not CJK)"
    text, kept = normalize_keeping_cjk_punctuation("２０２４年，ＡＩ！")
    assert text == "2024年，AI!" and kept == 1  # digits and letters still fold
    with pytest.raises(ValueError, match="cjk_punctuation"):
        CleanConfig(cjk_punctuation="drop")


def test_language_detection_english_chinese_japanese():
    docs, stats = detect_languages([Document(t, s) for t, s in [(EN, "a"), (ZH, "b"), (JA, "c")]])
    assert [d.language for d in docs] == ["en", "zh", "ja"]
    assert stats["languages"] == {"en": 1, "zh": 1, "ja": 1}
    assert [d.source for d in docs] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="klingon"):
        detect_languages(docs, languages=("english", "klingon"))


def test_chinese_near_duplicates_are_caught_and_different_paragraphs_kept():
    near = ZH.replace("语言统计", "语种统计")  # one character of 77 changed
    kept, stats = deduplicate([ZH, near, ZH_OTHER])
    assert [d.text for d in kept] == [ZH, ZH_OTHER]
    assert stats["near_duplicates"] == 1 and stats["near_examples"] == [("doc[0]", "doc[1]")]


@pytest.mark.skipif(not FORTUNES, reason="Debian package fortunes-zh is not installed")
def test_zh_fortunes_corpus_loads_without_terminal_escapes():
    docs, stats = load_documents("zh-fortunes", files=("tang300",), max_docs=50)
    assert len(docs) == stats["docs"] == 50 and stats["ansi_escapes_removed"] > 0
    assert all("\x1b" not in d.text and "%" != d.text for d in docs)
    assert "作者" in docs[0].text and docs[0].source == "fortunes-zh/tang300#0"
    with pytest.raises(ValueError, match="unknown fortunes-zh"):
        load_zh_fortunes(files=("nope",))
    with pytest.raises(FileNotFoundError, match="fortunes-zh"):
        load_zh_fortunes(folder=Path("/nonexistent"))


def test_pipeline_counts_languages_at_every_step(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Distinct documents: sentences of each language, rotated and numbered.
    zh_sentences = (ZH + ZH_OTHER).replace("？", "。").split("。")
    for i in range(30):
        (corpus / f"en{i:02d}.txt").write_text(f"Document {i}. " + " ".join([EN] * 3)[i:])
        zh = "。".join(zh_sentences[i % 5 :] + zh_sentences[: i % 5]) + f"第{i}号。"
        (corpus / f"zh{i:02d}.txt").write_text(zh[i % 7 :])
    config = DataConfig(
        source=str(corpus),
        vocab_size=400,
        block_size=32,
        val_fraction=0.2,
        test_fraction=0.1,
        decontaminate=False,  # the documents share their sentences on purpose: all would go
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = prepare_data(config, out_dir=tmp_path / "out")
    assert report["language"]["languages"] == {"en": 30, "zh": 30}
    for step in ("clean", "dedup", "filter"):
        assert set(report[step]["languages"]) == {"en", "zh"}, step
    by_split = report["split"]["languages"]
    assert sum(n for split in by_split.values() for n in split.values()) == 60 - sum(
        report["dedup"][k] for k in ("exact_duplicates", "near_duplicates")
    ) - sum(report["filter"]["removed"].values())
    assert report["tokenizer"]["languages"] == by_split["train"]
    per_language = report["tokenizer"]["validation_chars_per_token"]
    assert per_language and all(v["chars_per_token"] > 0 for v in per_language.values())


def test_chars_per_token_per_language(tiny_tokenizer_from_texts):
    docs = [Document(EN, "a", "en"), Document(ZH, "b", "zh")]
    out = chars_per_token(tiny_tokenizer_from_texts, texts_by_language(docs))
    assert set(out) == {"en", "zh"} and out["zh"]["chars"] == 77
    assert out["en"]["chars_per_token"] > out["zh"]["chars_per_token"] > 0


@pytest.mark.skipif(not FORTUNES, reason="Debian package fortunes-zh is not installed")
def test_load_mix_reports_each_source(tmp_path):
    (tmp_path / "en.txt").write_text(EN)
    docs, stats = load_mix([str(tmp_path), "zh-fortunes"], {"zh-fortunes": {"max_docs": 5}})
    assert len(docs) == stats["docs"] == 6
    assert stats["sources"]["zh-fortunes"]["docs"] == 5
    with pytest.raises(ValueError, match="at least one source"):
        load_mix([])


@pytest.fixture(scope="module")
def tiny_tokenizer_from_texts():
    from lmref.data.tokens import train_tokenizer

    tokenizer, _ = train_tokenizer([EN * 20, ZH_OTHER * 2], vocab_size=300)
    return tokenizer


def test_short_chinese_text_is_held_to_the_cjk_length():
    config = FilterConfig()
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"  # 24 characters: kept
    kept, stats = filter_documents(
        [poem, "你好，世界。", "Too short in English, yet 40 chars long."], config
    )
    assert [d.text for d in kept] == [poem]
    assert stats["removed"] == {"too_short": 2}
    assert len(poem) < config.min_chars  # the English rule alone would have dropped it


def test_chinese_punctuation_density_is_not_a_symbol_table():
    prose = "你好，世界！天气好；去公园？好，走。我饿，吃饭！"  # a mark every 2-3 characters: 0.33
    config = FilterConfig()
    kept, stats = filter_documents([prose, "| a | b |\n|---|---|\n| 1 | 2 |" * 4], config)
    assert [d.text for d in kept] == [prose]
    assert stats["removed"] == {"symbol_ratio": 1}
    assert (
        config.max_symbol_ratio < 0.33 < config.max_cjk_symbol_ratio
    )  # the English limit would drop it
