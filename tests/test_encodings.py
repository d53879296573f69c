"""Tests for lmref.data.encodings and its use in load_text_files: legacy and UTF-16 files decode
exactly, mojibake is repaired, binary and undecodable files are skipped and named."""

from __future__ import annotations

import os
import random

import pytest

from lmref.data.encodings import DecodeConfig, decode_bytes
from lmref.data.sources import load_text_files

pytestmark = pytest.mark.unit

ZH = "数据准备：语言检测、中文语料、分词器。这是一段用于测试的中文文本，包含常见的汉字和标点符号。"
ZH_HANT = (
    "資料準備：語言偵測、中文語料、分詞器。這是一段用於測試的中文文本，包含常見的漢字和標點符號。"
)
FR = "Le café était très bon, garçon! À bientôt, naïve señor; the crème brûlée costs 5 €."


@pytest.mark.parametrize(
    "text, codec, how",
    [
        (ZH, "gbk", "detected"),
        (ZH, "gb18030", "detected"),
        ("中文文本", "gbk", "detected"),  # short: a tie broken by the candidates' order
        (ZH_HANT, "big5", "detected"),
        (FR.replace("€", "E"), "latin-1", "detected"),
        (FR, "cp1252", "detected"),
        (f"Hello, {FR}", "utf-16-le", "detected"),  # no BOM, NULs on one parity
        (ZH, "utf-16-be", "detected"),  # no BOM, CJK: almost no NULs
        (ZH, "utf-16", "bom"),
        (FR, "utf-8-sig", "bom"),
        (ZH, "utf-8", "utf-8"),
    ],
)
def test_each_encoding_decodes_exactly(text, codec, how):
    decoded = decode_bytes(text.encode(codec))
    assert (decoded.text, decoded.how) == (text, how)
    assert 0.5 < decoded.confidence <= 1.0 and not decoded.mojibake_fixed


def test_mojibake_is_repaired_only_on_utf8_text():
    broken = "café crème".encode().decode("latin-1")  # 'cafÃ© crÃ¨me'
    decoded = decode_bytes(broken.encode())
    assert decoded.text == "café crème" and decoded.mojibake_fixed
    assert decode_bytes(broken.encode(), DecodeConfig(fix_mojibake=False)).text == broken
    assert decode_bytes(ZH.encode("gbk")).text == ZH  # legacy text is never "repaired"


def test_damaged_utf8_keeps_the_policy_and_counts_bytes():
    raw = ("valid café text " * 10).encode() + b"\xff\xfe"
    decoded = decode_bytes(raw)
    assert decoded.how == "utf-8-damaged" and decoded.undecodable_bytes == 2
    assert decoded.text.endswith("\ufffd\ufffd")
    with pytest.raises(UnicodeDecodeError):
        decode_bytes(raw, DecodeConfig(on_decode_error="raise"))
    with pytest.raises(ValueError, match="unknown encoding"):
        DecodeConfig(encoding="no-such-codec")


def test_binary_and_junk_are_not_text():
    rng = random.Random(0)
    junk = bytes(rng.randrange(256) for _ in range(4000))
    assert decode_bytes(junk).text is None
    assert decode_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(200)).how == "binary"


def test_load_text_files_decodes_counts_and_skips_by_name(tmp_path):
    (tmp_path / "zh_gbk.txt").write_bytes(ZH.encode("gbk"))
    (tmp_path / "zh_big5.txt").write_bytes(ZH_HANT.encode("big5"))
    (tmp_path / "fr_utf16.txt").write_bytes(FR.encode("utf-16"))
    (tmp_path / "plain.txt").write_text("plain UTF-8 text")
    (tmp_path / "junk.txt").write_bytes(bytes(range(128, 256)) * 4)  # no NUL, no encoding fits
    with pytest.warns(UserWarning, match="no known encoding"):
        docs, stats = load_text_files(tmp_path)
    texts = {d.source.rsplit("/", 1)[-1]: d.text for d in docs}
    assert texts == {
        "zh_gbk.txt": ZH,
        "zh_big5.txt": ZH_HANT,
        "fr_utf16.txt": FR,
        "plain.txt": "plain UTF-8 text",
    }
    assert stats["encodings"]["gb18030"] == 1 and stats["encodings"]["big5"] == 1
    assert stats["undecodable_files"] == [str(tmp_path / "junk.txt")]
    assert stats["decoded_by_file"][str(tmp_path / "zh_big5.txt")]["how"] == "detected"
    assert str(tmp_path / "plain.txt") not in stats["decoded_by_file"]
