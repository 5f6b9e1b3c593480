"""Every head style by name: adding one is a module in this package and a line here (and its name in
``mtpkit.config.STYLES``, which validates configs without importing torch)."""

from __future__ import annotations

from mtpkit.config import STYLES as STYLE_NAMES
from mtpkit.errors import MtpkitError
from mtpkit.heads.eagle import EagleStyle
from mtpkit.heads.eagle3 import Eagle3Style
from mtpkit.heads.medusa import MedusaStyle
from mtpkit.heads.sequential import SequentialStyle
from mtpkit.heads.style import HeadStyle

STYLES: dict[str, HeadStyle] = {style.name: style for style in (
    MedusaStyle(),
    SequentialStyle(),
    EagleStyle(),
    Eagle3Style(),
)}
assert tuple(STYLES) == STYLE_NAMES, "mtpkit.config.STYLES names the registered styles"


def style_of(name: str) -> HeadStyle:
    if name not in STYLES:
        raise MtpkitError(f"unknown head style {name!r}: choose one of {', '.join(STYLES)}")
    return STYLES[name]
