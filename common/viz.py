"""PNG panels (input / output / reference / error) and maps with a colour bar. Headless (Agg), atomic."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.files import atomic_path  # noqa: E402


def save_panel(
    path: str | Path,
    images: list[np.ndarray],
    titles: list[str],
    window: tuple[float, float] | None = None,
    error_index: list[int] | int | None = None,
    error_range: float | None = None,
    suptitle: str | None = None,
) -> Path:
    """A row of grayscale images shown in one display window (so they compare fairly); the panels listed in
    `error_index` are signed differences shown in a diverging map, symmetric around 0."""
    errors = {error_index} if isinstance(error_index, int) else set(error_index or [])
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    for i, (ax, img, title) in enumerate(zip(axes[0], images, titles)):
        img = np.asarray(img, dtype=np.float32)
        if i in errors:
            lim = error_range or float(np.percentile(np.abs(img), 99.5)) or 1.0
            im = ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        else:
            lo, hi = window if window is not None else (float(img.min()), float(img.max()))
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def save_map_with_colorbar(
    path: str | Path, array: np.ndarray, title: str, unit: str, cmap: str = "magma"
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 6 * array.shape[0] / max(array.shape[1], 1) + 0.5))
    im = ax.imshow(np.asarray(array, dtype=np.float32), cmap=cmap)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=unit)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
