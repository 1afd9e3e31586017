"""Scene understanding without weights (``classical_scene.py``): the two candidate detectors, run on the small
working copy of the image in Lab.

- ``region_masks``: SLIC superpixels merged greedily by Lab mean-colour distance (cheapest adjacent pair first); the
  regions alive when the merging passes each of ``_MERGE_THRESHOLDS`` are candidates, so an object is proposed both
  whole and, if its texture splits it, in parts.
- ``saliency_masks``: a saliency map (mean of a frequency-tuned colour-contrast map and a spectral-residual map),
  thresholded; each salient blob seeds a GrabCut (``cv2.grabCut``) inside its enlarged bounding box.

Both return ``(mask, confidence, source)`` triples: HxW bool masks in the working copy's frame, confidence in [0, 1].
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.segmentation import slic

_MERGE_THRESHOLDS = (10.0, 16.0, 24.0)
"""Lab distances at which the region-merging sequence is sampled for candidates."""
_MAX_SALIENT_BLOBS = 4
"""Salient blobs refined by GrabCut (largest saliency mass first)."""


def region_masks(small: np.ndarray, lab: np.ndarray) -> list[tuple[np.ndarray, float, str]]:
    """Regions of a colour-merging sequence over SLIC superpixels, sampled at a few thresholds.

    Returns (mask, confidence, "regions") triples; confidence is the Lab contrast with the surrounding ring.
    """
    h, w = lab.shape[:2]
    # slic rescales its input to [0, 1]; dividing the compactness by the Lab range keeps it in Lab units
    smooth = cv2.GaussianBlur(lab, (0, 0), 1.0)
    span = max(1e-3, float(smooth.max() - smooth.min()))
    labels = slic(
        smooth,
        n_segments=220,
        compactness=10.0 / span,
        sigma=0,
        convert2lab=False,
        start_label=0,
        channel_axis=-1,
        max_num_iter=6,
    )
    n = int(labels.max()) + 1
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    total = np.stack([np.bincount(flat, lab[..., c].ravel(), minlength=n) for c in range(3)], 1)
    adj = np.zeros((n, n), bool)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        adj[a[diff], b[diff]] = True
    adj |= adj.T
    mean = total / np.maximum(count, 1)[:, None]
    dist = np.linalg.norm(mean[:, None, :] - mean[None, :, :], axis=2)
    dist[~adj] = np.inf
    parent = np.arange(n)

    out: list[tuple[np.ndarray, float, str]] = []
    seen: set[bytes] = set()
    ring_kernel = np.ones((7, 7), np.uint8)
    for threshold in _MERGE_THRESHOLDS:
        # merge the closest pair of adjacent regions until none is closer than the threshold
        while True:
            i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
            if not dist[i, j] <= threshold:
                break
            total[i] += total[j]
            count[i] += count[j]
            count[j] = 0
            parent[parent == j] = i
            adj[i] |= adj[j]
            adj[i, i] = False
            adj[:, i] = adj[i]
            adj[j] = False
            adj[:, j] = False
            mean[i] = total[i] / count[i]
            row = np.linalg.norm(mean - mean[i], axis=1)
            row[~adj[i]] = np.inf
            dist[i] = row
            dist[:, i] = row
            dist[j] = np.inf
            dist[:, j] = np.inf
        region = parent[labels]
        for r in np.flatnonzero((count >= 0.004 * h * w) & (count <= 0.7 * h * w)):
            mask = region == r
            key = np.packbits(mask).tobytes()
            if key in seen:
                continue
            seen.add(key)
            ring = cv2.dilate(mask.astype(np.uint8), ring_kernel).astype(bool) & ~mask
            if ring.any():
                contrast = float(np.linalg.norm(mean[r] - lab[ring].mean(0)))
                out.append((mask, min(1.0, contrast / 40.0), "regions"))
    return out


def _saliency(small: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """HxW float32 in [0, 1]: mean of frequency-tuned colour contrast and spectral residual."""
    h, w = lab.shape[:2]
    blurred = cv2.GaussianBlur(lab, (5, 5), 0)
    ft = np.linalg.norm(blurred - lab.reshape(-1, 3).mean(0), axis=2)
    ft = ft / max(float(ft.max()), 1e-6)

    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    side = 64
    g = cv2.resize(gray, (side, max(8, round(side * h / w))), interpolation=cv2.INTER_AREA)
    spec = np.fft.fft2(g)
    log_amp = np.log(np.abs(spec) + 1e-6)
    residual = log_amp - cv2.blur(log_amp.astype(np.float32), (3, 3))
    sr = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spec)))) ** 2
    sr = cv2.GaussianBlur(sr.astype(np.float32), (0, 0), 2.5)
    sr = cv2.resize(sr, (w, h), interpolation=cv2.INTER_LINEAR)
    sr = sr / max(float(sr.max()), 1e-6)
    return (0.5 * ft + 0.5 * sr).astype(np.float32)


def saliency_masks(small: np.ndarray, lab: np.ndarray) -> list[tuple[np.ndarray, float, str]]:
    """Salient blobs refined by GrabCut inside their enlarged bounding boxes.

    Returns (mask, confidence, "saliency") triples; confidence is the saliency contrast of the mask.
    """
    h, w = lab.shape[:2]
    sal = _saliency(small, lab)
    thresh = max(2.0 * float(sal.mean()), 0.25)
    blobs = (sal > thresh).astype(np.uint8)
    blobs = cv2.morphologyEx(blobs, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(blobs, connectivity=8)
    mass = np.bincount(comp.ravel(), sal.ravel(), minlength=n)
    order = [
        i for i in np.argsort(-mass[1:], kind="stable") + 1 if stats[i, cv2.CC_STAT_AREA] >= 0.002 * h * w
    ]
    bgr = np.ascontiguousarray(small[..., ::-1])
    out: list[tuple[np.ndarray, float, str]] = []
    for i in order[:_MAX_SALIENT_BLOBS]:
        x, y, bw, bh = stats[i, :4]
        mx, my = max(4, bw // 5), max(4, bh // 5)
        x0, y0, x1, y1 = max(0, x - mx), max(0, y - my), min(w, x + bw + mx), min(h, y + bh + my)
        # crop with a wider margin so GrabCut's background model sees the surroundings
        cx0, cy0 = max(0, x0 - 2 * mx), max(0, y0 - 2 * my)
        cx1, cy1 = min(w, x1 + 2 * mx), min(h, y1 + 2 * my)
        init = np.full((cy1 - cy0, cx1 - cx0), cv2.GC_BGD, np.uint8)
        init[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = cv2.GC_PR_BGD
        init[(comp[cy0:cy1, cx0:cx1] == i)] = cv2.GC_PR_FGD
        if not (init == cv2.GC_BGD).any():
            init[0, :] = cv2.GC_BGD  # GrabCut needs some background samples
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's RNG
        try:
            cv2.grabCut(
                bgr[cy0:cy1, cx0:cx1],
                init,
                None,
                np.zeros((1, 65)),
                np.zeros((1, 65)),
                3,
                cv2.GC_INIT_WITH_MASK,
            )
        except cv2.error:
            continue
        mask = np.zeros((h, w), bool)
        mask[cy0:cy1, cx0:cx1] = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)
        if not mask.any():
            continue
        inside = float(sal[mask].mean())
        outside = float(sal[~mask].mean()) if (~mask).any() else 0.0
        out.append((mask, min(1.0, max(0.0, inside - outside) / 0.4), "saliency"))
    return out
