"""The torch ``Dataset`` over annotation records: read, crop, augment, normalise."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from aanet.datasets.augment import NO_AUGMENT, AugmentConfig, augment_sample
from aanet.datasets.images import read_image
from aanet.datasets.records import DataError, Record

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
    """

    def __init__(
        self,
        records: list[Record],
        size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("records: expected at least one annotated face, got none")
        self.records = records
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of ``epoch`` (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        try:  # the header was checked at load time (validate_record), the data not
            image = read_image(record.image_path)
        except OSError as exc:
            raise DataError(
                record.where,
                f"cannot decode image {record.image_path} (its header reads, its data does not: "
                f"a truncated or damaged file; replace it or remove its line): {exc}",
            ) from exc
        rng = None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
        crop, points, matrix = augment_sample(
            image, record.landmarks, record.box, self.size, rng, self.augment or NO_AUGMENT
        )
        return {
            "image": to_tensor(crop),
            "landmarks": torch.from_numpy(points),
            "attributes": torch.from_numpy(record.attributes),
            "matrix": torch.from_numpy(matrix.astype(np.float32)),
            "index": torch.tensor(index),
        }
