"""Training augmentation: the label must move with the photograph (no PyTorch needed).

The check uses an image whose target is a function of the image itself (its red channel / 255),
so it holds for every pixel of every view whatever the random geometry: if the target were
warped differently from the image (or not at all) it would fail on almost every pixel.
"""

import cv2
import numpy as np
import pytest

from retina_batch.training.augment import AugmentConfig, augment

# Photometry off (contrast 1, brightness 0, gamma 1, no colour change, blur, noise or JPEG):
# the image of a view is then the warped photograph itself.
GEOMETRY_ONLY = AugmentConfig(crop=48, contrast=(1.0, 1.0), brightness=0.0, gamma=(1.0, 1.0),
                              colour=0.0, p_blur=0, p_noise=0, p_jpeg=0)


def smooth_photograph(seed: int, size: int = 96) -> np.ndarray:
    coarse = np.random.default_rng(seed).uniform(0, 255, (6, 6, 3)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 255) \
        .astype(np.uint8)


@pytest.mark.parametrize("seed", range(3))
def test_target_is_warped_exactly_like_the_image(seed):
    image = smooth_photograph(seed)
    target = image[..., 0].astype(np.float32) / 255
    fov = np.ones(image.shape[:2], np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(12):  # rotations, scales and flips
        view, view_target = augment(image, target, fov, rng, GEOMETRY_ONLY)
        assert view.shape == (48, 48, 3) and view_target.shape == (48, 48)
        # Bilinear resampling of uint8 rounds to whole grey levels: at most ~1 level apart.
        gap = np.abs(view_target - view[..., 0].astype(np.float32) / 255)
        assert gap.max() <= 1.5 / 255, gap.max() * 255


def test_vessel_labels_stay_on_dark_vessels_with_photometry_on():
    """The real recipe's photometry changes brightness and colour but keeps vessels darker
    than the background they were labelled on."""
    image = np.full((200, 200, 3), 170, np.uint8)
    target = np.zeros((200, 200), np.float32)
    for x in range(8, 200, 16):  # dark vertical 'vessels', 4 px wide
        image[:, x:x + 4] = 60
        target[:, x:x + 4] = 1
    # Views are centred on FOV pixels: keep them in the middle so no view reaches the border.
    fov = np.zeros((200, 200), np.uint8)
    fov[60:140, 60:140] = 1
    rng = np.random.default_rng(0)
    for _ in range(10):
        view, view_target = augment(image, target, fov, rng, AugmentConfig(crop=48))
        vessel, background = view_target > 0.9, view_target < 0.1
        assert vessel.any() and background.any()
        assert view[vessel].mean() < view[background].mean() - 40
