"""The torch ``Dataset`` over annotation records: read, crop, augment, normalise."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from aanet.datasets.augment import NO_AUGMENT, AugmentConfig, augment_sample
from aanet.datasets.images import read_image
from aanet.datasets.records import ON_ERROR_CHOICES, DataError, Record

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32)


def to_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """BGR uint8 ``(H, W, 3)`` to a normalised RGB float ``(3, H, W)`` tensor."""
    rgb = image_bgr[:, :, ::-1].astype(np.float32) / 255.0
    return torch.from_numpy(((rgb - MEAN) / STD).transpose(2, 0, 1).copy())


class LandmarkDataset(Dataset):
    """Crops of ``size`` pixels around each record's box; landmarks in crop pixels.

    With ``augment`` the random transforms draw from a generator seeded by ``(seed, epoch,
    index)``, so a resumed run sees the same augmentations as an uninterrupted one.

    A face whose image does not decode now (its header was checked at load time, its pixels not;
    or the file changed since) raises :class:`DataError` under ``on_error="stop"``. Under
    ``"skip"`` the next face of the set whose image decodes stands in for it, and the sample's
    ``"left_out"`` is the error (``""`` when the sample is the face asked for): the caller
    reports it, and evaluation leaves such samples out. A stand-in keeps every batch full, so
    the ranks of a DDP run take the same number of steps, and it depends only on the files, so
    ``--resume`` sees the same samples. ``"stop"`` is the default here: a caller that reads no
    ``"left_out"`` must not train on stand-ins unawares.
    """

    def __init__(
        self,
        records: list[Record],
        size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        on_error: str = "stop",
    ) -> None:
        if not records:
            raise ValueError("records: expected at least one annotated face, got none")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error: expected one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.records = records
        self.size = size
        self.augment = augment
        self.seed = seed
        self.on_error = on_error
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of ``epoch`` (call before each epoch). This sets this
        process's copy: the workers of a ``DataLoader`` (persistent ones most of all) keep the
        copy they started with, so a loader with workers takes ``(epoch, index)`` items from an
        :class:`EpochIndices` sampler instead."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> np.ndarray:
        """The image of face ``index``; :class:`DataError` naming its line and file if it is gone
        or does not decode."""
        record = self.records[index]
        if not record.image_path.is_file():
            raise DataError(
                record.where, f"image not found: {record.image_path} (removed after loading)"
            )
        try:  # the header was checked at load time (validate_record), the data not
            return read_image(record.image_path)
        except OSError as exc:
            raise DataError(
                record.where,
                f"cannot decode image {record.image_path} (a truncated or damaged file, or one "
                f"changed after loading; replace it or remove its line): {exc}",
            ) from exc

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        """The sample of face ``item``, augmented for ``set_epoch``'s epoch, or for ``epoch``
        when ``item`` is ``(epoch, index)``."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        epoch, index = int(epoch), int(index)
        left_out = ""
        for step in range(len(self.records)):
            source = (index + step) % len(self.records)
            try:
                image = self.read(source)
                break
            except DataError as error:
                if self.on_error == "stop":
                    raise
                left_out = left_out or str(error)
        else:
            raise DataError(f"none of the {len(self.records)} images decodes; {left_out}")
        record = self.records[source]
        rng = None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
        crop, points, matrix = augment_sample(
            image, record.landmarks, record.box, self.size, rng, self.augment or NO_AUGMENT
        )
        return {
            "image": to_tensor(crop),
            "landmarks": torch.from_numpy(points),
            "attributes": torch.from_numpy(record.attributes),
            "matrix": torch.from_numpy(matrix.astype(np.float32)),
            "index": torch.tensor(index),
            "left_out": left_out,
        }


class EpochIndices(Sampler):
    """``sampler``'s indices as ``(epoch, index)`` items for :class:`LandmarkDataset`: the epoch
    travels with each index to whichever process reads it. ``set_epoch`` sets both."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
