"""The model's image input without torch: an RGB picture of any size -> the R x R uint8 pixels the VAE encodes.

Apart from pipeline.py (which imports torch and transformers) so that a batch job's CPU stage makes model-ready
pixels with this same function without importing either (workers/images.py model_pixels); pipeline.py's
preprocess_image uses it too, so there is one resize.
"""

import numpy as np
from PIL import Image


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """PIL RGB image -> (size, size, 3) uint8: the shorter side resized to `size` (bicubic), the longer one scaled
    and truncated, then the centre crop, as upstream inference_mmu.py (torchvision Resize(size), CenterCrop(size))."""
    w, h = image.size
    image = image.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BICUBIC)
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)  # (size, size, 3)
