"""Units of text across scripts (lmref.data.language): CJK characters count one by one."""

import pytest

from lmref.data.language import cjk_fraction, text_units

pytestmark = pytest.mark.unit


def test_spaced_text_units_are_str_split():
    text = "The quick  brown\nfox, jumps. Ünïcode words\tstay whole"
    assert text_units(text) == text.split()


def test_chinese_paragraph_is_one_unit_per_character():
    paragraph = "数据清洗之后，模型才能学到有用的东西！"
    units = text_units(paragraph)
    assert len(paragraph.split()) == 1  # what a word filter used to see
    assert units == list(paragraph)
    assert text_units("用 Python 写") == ["用", "Python", "写"]


def test_cjk_fraction():
    assert cjk_fraction("") == 0.0
    assert cjk_fraction("plain English") == 0.0
    assert cjk_fraction("中文") == 1.0
    assert cjk_fraction("你好 world") == pytest.approx(2 / 7)
