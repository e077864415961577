"""The columns every fedmm dataset has, bundled or user-provided."""

from __future__ import annotations

from datasets import Array3D, ClassLabel, Features, Value


def features(class_names: list[str], image_size: int, group_names: list[str] | None = None) -> Features:
    """image (uint8 HxWx3), caption, label (-1 = none), group (named when ``group_names``), toxic flag, client id."""
    return Features(
        {
            "image": Array3D(shape=(image_size, image_size, 3), dtype="uint8"),
            "caption": Value("string"),
            "label": ClassLabel(names=class_names),
            "group": ClassLabel(names=group_names) if group_names else Value("int64"),
            "toxic": Value("bool"),
            "client": Value("string"),
        }
    )
