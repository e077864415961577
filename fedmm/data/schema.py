"""The columns every fedmm dataset has, bundled or user-provided."""

from __future__ import annotations

from datasets import Array3D, ClassLabel, Features, Value


def features(class_names: list[str], image_size: int | None, group_names: list[str] | None = None) -> Features:
    """image, caption, label (-1 = none), group (named when ``group_names``), toxic flag, client id.

    ``image`` is a uint8 HxWx3 array of ``image_size`` (the bundled digits, in memory), or with ``image_size``
    None a file path, decoded per batch at the model's own resolution (manifests: fedmm/data/images.py).
    """
    return Features(
        {
            "image": Array3D(shape=(image_size, image_size, 3), dtype="uint8") if image_size else Value("string"),
            "caption": Value("string"),
            "label": ClassLabel(names=class_names),
            "group": ClassLabel(names=group_names) if group_names else Value("int64"),
            "toxic": Value("bool"),
            "client": Value("string"),
        }
    )
