"""Issue 15 split units: font families with their metric clones, base emoji (pure functions, fast)."""

from __future__ import annotations

import numpy as np

from training.demo_data import plan_task
from training.source_types import Source
from training.split_groups import emoji_base, font_family


def test_font_family_groups_faces_superfamilies_and_clones() -> None:
    same = [
        ("Liberation Sans", "LiberationSans-Bold.ttf"),
        ("Arimo", "Arimo-Regular.ttf"),
        ("Nimbus Sans", "NimbusSans-Regular.otf"),
        ("TeX Gyre Heros", "texgyreheros-regular.otf"),
        ("FreeSans", "FreeSans.ttf"),
    ]
    assert {font_family(f, p) for f, p in same} == {"helvetica"}
    assert font_family("Tinos") == font_family("Liberation Serif") == font_family("FreeSerif") == "times"
    assert font_family("Cousine") == font_family("Liberation Mono") == "courier"
    assert font_family("DejaVu Sans Mono") == font_family("DejaVu Serif Condensed") == "dejavu"
    assert font_family("Bitstream Vera Sans") == "dejavu"
    assert font_family("Latin Modern Roman 10") == font_family("LM Sans 12") == "computer modern"
    assert font_family("Noto Sans Display") == font_family("Noto Serif") == "noto"
    assert font_family("Lato Black") == font_family("Lato") == "lato"
    assert font_family("", "Gentium-Bold.ttf") == "gentium"  # no family name: the file name
    assert font_family("Lato") != font_family("Roboto")


def test_emoji_base_collapses_person_and_gender_variants() -> None:
    assert {emoji_base(n) for n in ("man health worker", "woman health worker", "health worker")} == {
        "health worker"
    }
    assert emoji_base("woman gesturing OK") == emoji_base("person gesturing OK") == "gesturing ok"
    assert emoji_base("man: red hair") == emoji_base("person: red hair") == "red hair"
    assert emoji_base("family: man, woman, boy") == emoji_base("family: woman, girl") == "family"
    assert emoji_base("kiss: woman, man") == emoji_base("kiss") == "kiss"
    assert emoji_base("men holding hands") == emoji_base("woman and man holding hands") == "holding hands"
    assert emoji_base("man") == emoji_base("girl") == "person"
    assert emoji_base("flag: Germany") != emoji_base("flag: France")  # flags stay apart
    assert emoji_base("grinning face") == "grinning face"


def test_group_split_never_shares_a_base_emoji() -> None:
    names = ["man health worker", "woman health worker", "health worker", "grinning face", "flag: Chad"] * 8
    bases = np.unique([emoji_base(n) for n in names], return_inverse=True)[1]
    rng = np.random.default_rng(0)
    src = Source("emoji", rng.integers(0, 255, (len(names), 4, 4), dtype=np.uint8), np.arange(len(names)) % 2,
                 ("a", "b"), "t", "t", groups=bases.astype(np.int64) * 10 + np.arange(len(names)) // 5 % 10,
                 group_kind="base emoji")  # fmt: skip
    data = plan_task(src, "emoji", None, 0.3, 0)
    assert not set(src.groups[data.train]) & set(src.groups[data.val])
