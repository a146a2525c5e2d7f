"""The input images of `precompute_latents.py`: listing them, fingerprinting their bytes, decoding any mode to RGB.

An input is an image folder (one sub-folder per class, or images only) or a `datasets` dataset, read as an
`ImageSource`: names, labels and class names in a fixed order, and the raw bytes of each image on demand.

Its fingerprint is content, not a listing: the SHA-256 of every image's bytes (the file's bytes for folders and path
columns, the stored bytes for datasets), with its name and label, per shard of consecutive images. Hashing reads
the bytes but decodes nothing, so it costs a fraction of the encoding it guards.

Every PIL mode becomes 8-bit RGB (`to_rgb`):

- 16-bit greyscale (`I;16`, any byte order) is scaled by its type's range, 0..65535 -> 0..255, not clipped.
- 32-bit integers (`I`, also PIL's mode for signed 16-bit files) and floats (`F`) hold counts, depths, Hounsfield
  units or radiance: no range is shared by such images, and the type's range would turn most of them black. So an
  `I` image within 0..255 is kept as 8-bit, an `F` image within 0..1 is scaled by 255, and any other is stretched
  by its own range, min..max -> 0..255 (a constant one becomes black). NaN or infinite pixels make it unreadable.
- Transparency (`RGBA`, `LA`, `PA`, palettes with a transparent colour, premultiplied `RGBa`/`La`) is composited on
  white; palettes (`P`), 1-bit, `CMYK` (PIL's conversion, without colour management), `YCbCr`, `LAB` and `HSV` use
  PIL's conversion; a mode it cannot convert makes the image unreadable, with PIL's message naming the mode. EXIF
  orientation is applied when an image is read.
"""

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}

# High bit depth modes -> the ranges tried in order; the first that holds every pixel maps to 0..255, else min..max.
HIGH_DEPTH_RANGES = {
    "I;16": ((0, 65535),),
    "I;16L": ((0, 65535),),
    "I;16B": ((0, 65535),),
    "I;16N": ((0, 65535),),
    "I": ((0, 255),),
    "F": ((0.0, 1.0),),
}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def to_8bit(image: Image.Image) -> Image.Image:
    """Scale a high bit depth greyscale image (`HIGH_DEPTH_RANGES`) to 8 bits (mode `L`)."""
    pixels = np.asarray(image, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise ValueError(f"the mode {image.mode} image has NaN or infinite pixels")
    lo, hi = pixels.min(), pixels.max()
    low, high = next(((a, b) for a, b in HIGH_DEPTH_RANGES[image.mode] if a <= lo and hi <= b), (lo, hi))
    scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB (the rules are in the module docstring)."""
    if image.mode in HIGH_DEPTH_RANGES:
        image = to_8bit(image)  # PIL's own conversions clip at 255 (white) or truncate floats (black)
    elif image.mode == "La":
        image = image.convert("LA")  # PIL converts premultiplied grey + alpha to LA only
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        # Dropping alpha would expose whatever colour hides under transparent pixels (often black); white is neutral.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Resize and centre-crop as DiT/ADM do: BOX halvings while large, one BICUBIC resize, then a centre crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def load_image(value: str | os.PathLike | bytes | dict) -> Image.Image:
    """Open and fully decode an image (path, bytes, or a `datasets.Image(decode=False)` dict) with EXIF rotation."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, bytes):
        value = io.BytesIO(value)
    try:
        image = Image.open(value)
    except UnidentifiedImageError:  # its message names a BytesIO object's address, which helps no one
        raise UnidentifiedImageError("cannot identify the image format: not an image file Pillow reads") from None
    with image:
        image.load()  # decode now so a truncated file fails here, not halfway through the pipeline
        return ImageOps.exif_transpose(image)  # a copy that outlives the file


def preprocess_image(image: Image.Image, resolution: int) -> np.ndarray:
    """The `(resolution, resolution, 3)` uint8 array the encoder sees for one image."""
    return np.array(center_crop_arr(to_rgb(image), resolution))


def read_value(value: str | os.PathLike | dict | None) -> bytes:
    """The raw bytes of one image given as a path or a `datasets.Image(decode=False)` dict; OSError if unreadable."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if value is None:
        raise FileNotFoundError("the row holds neither image bytes nor a path")
    return Path(value).read_bytes()


def content_digest(data: bytes | Exception) -> str:
    """SHA-256 of an image's bytes; for a file that cannot be read, the kind of error (so a fix changes it)."""
    if isinstance(data, Exception):
        return f"unreadable: {type(data).__name__}"
    return hashlib.sha256(data).hexdigest()


def shard_fingerprint(
    ids: list[str], labels: list[int] | None, digests: list[str], captions: list[str] | None = None
) -> str:
    """Fingerprint of a run of input images: each one's name, label, content digest and caption, in order."""
    labels = labels if labels is not None else [None] * len(ids)
    lines = (f"{i}\t{y}\t{d}\n" for i, y, d in zip(ids, labels, digests, strict=True))
    if captions is not None:  # a caption is part of its row: an edited caption makes its shard be encoded again
        lines = (f"{line}{c!r}\n" for line, c in zip(lines, captions, strict=True))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass
class ImageSource:
    """The input images in a fixed order: their names, labels, class names, and how to read each one's bytes."""

    ids: list[str]  # a row's name in messages and in the cache's `source` column
    labels: list[int] | None  # None: unconditional
    class_names: list[str] | None
    paths: list[str] | None = None  # an image folder
    dataset: datasets.Dataset | None = None  # a dataset, images left undecoded
    image_column: str = "image"
    captions: list[str] | None = None  # a text-to-image cache (`dp_utils.data.captions`)

    def values(self, start: int, end: int) -> list:
        """The undecoded images `start..end`: paths, or the dataset's `{"bytes", "path"}` dicts or path strings."""
        if self.paths is not None:
            return self.paths[start:end]
        return self.dataset[start:end][self.image_column]

    def read_bytes(self, i: int) -> bytes:
        """The raw bytes of input image `i` (OSError if they cannot be read)."""
        return read_value(self.values(i, i + 1)[0])

    def fingerprint(self, start: int, end: int, digests: list[str] | None = None) -> str:
        """`shard_fingerprint` of images `start..end`, hashing their bytes (in threads) unless `digests` are given."""
        if digests is None:

            def digest(value) -> str:
                try:
                    return content_digest(read_value(value))
                except OSError as error:
                    return content_digest(error)

            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
                digests = list(pool.map(digest, self.values(start, end)))
        labels = self.labels[start:end] if self.labels is not None else None
        captions = self.captions[start:end] if self.captions is not None else None
        return shard_fingerprint(self.ids[start:end], labels, digests, captions)


def read_image_folder(root: str, unconditional: bool) -> ImageSource:
    """List an image folder: one sub-folder per class (labels in sorted name order), or only images (unconditional)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--train_data_dir {root} is not a directory.")

    def images_in(folder: Path) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath, f) for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        return found

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if class_dirs and loose:
        raise UserError(
            f"--train_data_dir {root} has both class sub-folders ({', '.join(p.name for p in class_dirs[:5])}) and "
            f"loose images ({', '.join(p.name for p in loose[:5])}). Move the images into class folders, or use a "
            "folder of images only for unconditional data."
        )
    groups = [(d.name, images_in(d)) for d in class_dirs] or [(None, loose)]
    for name, files in groups:
        if name is not None and not files:
            raise UserError(f"Class folder {root / name} has no images; add images or remove the folder.")
    files = [f for _, files in groups for f in files]
    if not files:
        raise UserError(f"--train_data_dir {root} holds no images (extensions {sorted(IMAGE_EXTENSIONS)[:12]}...).")
    conditional = bool(class_dirs) and not unconditional
    return ImageSource(
        ids=[f.relative_to(root).as_posix() for f in files],
        labels=[k for k, (_, files) in enumerate(groups) for _ in files] if conditional else None,
        class_names=[name for name, _ in groups] if conditional else None,
        paths=[str(f) for f in files],
    )


def read_dataset(
    name: str,
    split: str,
    image_column: str,
    label_column: str | None,
    config_name: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> ImageSource:
    """Load a Hub dataset, a local folder `datasets.load_dataset` reads, or a `save_to_disk` folder; check columns.

    `label_column` None: 'label' if the dataset has one, else unconditional; 'none': unconditional.
    """
    try:
        if any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, config_name, data_dir=data_dir, split=split, cache_dir=cache_dir)
    except (ValueError, IndexError, OSError) as error:
        # datasets refuses empty splits and unknown names; a save_to_disk folder may be empty, truncated or edited
        raise UserError(f"Could not load split '{split}' of --dataset_name {name}: {error!r}") from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"--split {split} is not in {name}; available splits: {list(dataset)}.")
        dataset = dataset[split]
    columns = dataset.column_names
    if image_column not in columns:
        raise UserError(f"--image_column '{image_column}' is not in {name}; available columns: {columns}.")
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves, per row
    elif feature != datasets.Value("string"):
        raise UserError(f"--image_column '{image_column}' holds {feature}, not images or image file paths.")
    if len(dataset) == 0:
        raise UserError(f"Split '{split}' of {name} is empty: nothing to encode.")
    if label_column is None:
        label_column = "label" if "label" in columns else "none"
    labels = class_names = None
    if label_column.lower() != "none":
        if label_column not in columns:
            raise UserError(
                f"--label_column '{label_column}' is not in {name}; available columns: {columns}. "
                "Pass --label_column <name>, or --label_column none for an unconditional cache."
            )
        labels, class_names = read_labels(dataset, label_column)
    return ImageSource(
        ids=[f"{split}[{i}]" for i in range(len(dataset))],
        labels=labels,
        class_names=class_names,
        dataset=dataset,
        image_column=image_column,
    )


def read_labels(dataset: datasets.Dataset, label_column: str) -> tuple[list[int], list[str]]:
    """Class ids of every row and the class names: a ClassLabel's, sorted string labels, or 0..max of int ids."""
    values = dataset.select_columns([label_column]).to_dict()[label_column]
    feature = dataset.features[label_column]
    if None in values:
        raise UserError(f"Row {values.index(None)} has no label; drop such rows or pass --label_column none.")
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    elif all(isinstance(v, str) for v in values):
        class_names = sorted(set(values))
        index = {c: k for k, c in enumerate(class_names)}
        values = [index[v] for v in values]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        class_names = [str(k) for k in range(max(values) + 1)]
    else:
        raise UserError(f"--label_column '{label_column}' holds {feature}: expected class ids or names.")
    bad = [i for i, v in enumerate(values) if not 0 <= v < len(class_names)]
    if bad:
        raise UserError(
            f"Row {bad[0]} has label {values[bad[0]]}, outside 0..{len(class_names) - 1}; drop "
            "unlabelled rows, or pass --label_column none for an unconditional cache."
        )
    return values, class_names
