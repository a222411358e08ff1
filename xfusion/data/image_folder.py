"""A labelled image set in torchvision's ImageFolder layout: `root/<class>/**/<image>`.

The classes are the names of the subfolders of `root`, sorted (class index = position), and each
class's images are every file below its folder with an image suffix, walked in sorted order,
links followed: `torchvision.datasets.ImageFolder` (`find_classes`, `make_dataset`) exactly,
without its import and without its loader, so that a corrupt image is a bad input under
`data.bad_input_policy` (xfusion.data) instead of an exception in the middle of a job.
ImageNet's `train/` and `val/` (val sorted into its 1,000 synset folders) are such folders, and
so is the tiny world's probe set (`xfusion.data.world_probe`).

References: torchvision.datasets.folder (find_classes, make_dataset, IMG_EXTENSIONS).
"""

from __future__ import annotations

import os
from pathlib import Path

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as there.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(root: str | Path) -> tuple[list[str], dict[str, int]]:
    """(sorted class names, {name: index}) of the subfolders of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (an ImageFolder root: one "
                                "subfolder per class)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders (ImageFolder layout: "
                                f"{root}/<class>/<image>)")
    return classes, {name: k for k, name in enumerate(classes)}


def image_folder_samples(root: str | Path, max_per_class: int | None = None
                         ) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(image path, class index)], classes): every image of every class, class by class in
    index order, files in sorted walk order; at most `max_per_class` (the first) of each."""
    classes, index = find_classes(root)
    samples: list[tuple[Path, int]] = []
    empty: list[str] = []
    for name in classes:
        found = 0
        for folder, _, files in sorted(os.walk(Path(root) / name, followlinks=True)):
            for file in sorted(files):
                if max_per_class is not None and found >= max_per_class:
                    break
                if file.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(folder) / file, index[name]))
                    found += 1
        if not found:
            empty.append(name)
    if empty:  # as torchvision's make_dataset: a class without images is a layout error
        raise FileNotFoundError(f"{root}: no image ({', '.join(IMG_EXTENSIONS)}) in the class "
                                f"folders {', '.join(empty[:5])}{' …' if len(empty) > 5 else ''}")
    return samples, classes
