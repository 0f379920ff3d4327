"""U-Net's elastic deformation (Ronneberger et al., MICCAI 2015, Sec. 3.1).

"We generate smooth deformations using random displacement vectors on a coarse 3 by 3 grid.
The displacements are sampled from a Gaussian distribution with 10 pixels standard deviation.
Per-pixel displacements are then computed using bicubic interpolation." The image is resampled
bicubically; the mask with nearest neighbour, so every output label is an input label.
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # a data pipeline must not phone home on import
import albumentations as A  # noqa: E402

__all__ = ["elastic_maps", "GridElastic"]


def elastic_maps(
    shape: tuple[int, int], rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Sampling maps for ``cv2.remap``: identity plus a bicubically upsampled ``grid x grid`` displacement."""
    h, w = shape
    coarse = rng.normal(0.0, sigma, size=(grid, grid, 2)).astype(np.float32)
    disp = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    map_x = np.arange(w, dtype=np.float32)[None, :] + disp[..., 0]
    map_y = np.arange(h, dtype=np.float32)[:, None] + disp[..., 1]
    return map_x, map_y


class GridElastic(A.DualTransform):
    """Albumentations transform for :func:`elastic_maps`: bicubic image, nearest mask, mirrored border."""

    def __init__(
        self, grid: int = 3, sigma: float = 10.0, border_mode: int = cv2.BORDER_REFLECT_101, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        if grid < 2 or sigma < 0:
            raise ValueError(f"GridElastic needs grid >= 2 and sigma >= 0, got grid={grid}, sigma={sigma}")
        self.grid, self.sigma, self.border_mode = grid, sigma, border_mode

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        map_x, map_y = elastic_maps(params["shape"][:2], self.random_generator, self.grid, self.sigma)
        return {"map_x": map_x, "map_y": map_y}

    def _remap(self, array: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, interpolation: int) -> np.ndarray:
        out = cv2.remap(array, map_x, map_y, interpolation, borderMode=self.border_mode)
        return out.reshape(out.shape[:2] + array.shape[2:])  # cv2 drops a trailing channel axis of 1

    def apply(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: Any) -> np.ndarray:
        return self._remap(img, map_x, map_y, cv2.INTER_CUBIC)

    def apply_to_mask(self, mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: Any) -> np.ndarray:
        return self._remap(mask, map_x, map_y, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("grid", "sigma", "border_mode")
