"""S_vis (LPIPS on the visible region) and S_gen (directional similarity), given the networks as callables.

No weights are loaded here: the callers pass the networks in, so a real LPIPS / CLIP loaded from the registry and
a randomly initialised stand-in plug into the same code. Batched tensors throughout (the Ray Data actors' form):
colour Bx3xHxW float in [0, 1], masks Bx1xHxW float or bool. :func:`layers_to_tensors` turns the sample format's
uint8 arrays into that form.

Interfaces:
    LPIPSFn: ``(a, b) -> distances``, a and b Bx3xHxW in [-1, 1] (the ``lpips`` package's convention), returning B
        values (any shape with B elements: ``lpips.LPIPS`` returns Bx1x1x1).
    FeatureFn: ``images -> features``, images Bx3xHxW in [0, 1], returning BxD (it resizes and normalises for its
        own network, e.g. CLIP's 224 px and mean/std).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LPIPSFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def layers_to_tensors(layers: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack B HxWx4 uint8 straight-alpha layers into (rgb Bx3xHxW, alpha Bx1xHxW), float32 in [0, 1]."""
    if not layers:
        raise ValueError("layers_to_tensors: no layers")
    shapes = {tuple(x.shape) for x in layers}
    if len(shapes) != 1 or any(x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 4 for x in layers):
        raise ValueError(
            f"layers_to_tensors: expected HxWx4 uint8 layers of one shape, got shapes {sorted(shapes)}"
        )
    t = torch.from_numpy(np.stack(layers)).permute(0, 3, 1, 2).float() / 255.0
    return t[:, :3].contiguous(), t[:, 3:].contiguous()


def masks_to_tensor(masks: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack B HxW masks (bool, or uint8 0/255 thresholded at 128) into Bx1xHxW float32 of 0 and 1."""
    arr = np.stack([np.asarray(m) for m in masks])
    if arr.ndim != 3:
        raise ValueError(f"masks_to_tensor: expected HxW masks, got stacked shape {arr.shape}")
    binary = arr if arr.dtype == np.bool_ else arr >= 128
    return torch.from_numpy(binary.astype(np.float32)).unsqueeze(1)


def _check(pred_rgb: torch.Tensor, gt_rgb: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    if pred_rgb.shape != gt_rgb.shape or pred_rgb.ndim != 4 or pred_rgb.shape[1] != 3:
        raise ValueError(
            f"prediction {tuple(pred_rgb.shape)} and ground truth {tuple(gt_rgb.shape)} must be the same Bx3xHxW"
        )
    want = (gt_rgb.shape[0], 1, *gt_rgb.shape[2:])
    if tuple(visible.shape) != want:
        raise ValueError(
            f"visible mask {tuple(visible.shape)} must be {want} for images {tuple(gt_rgb.shape)}"
        )
    return visible.to(gt_rgb.dtype)


@torch.no_grad()
def lpips_visible(
    pred_rgb: torch.Tensor, gt_rgb: torch.Tensor, visible: torch.Tensor, lpips_fn: LPIPSFn
) -> torch.Tensor:
    """S_vis: LPIPS between ``g_rgb * g_v`` and ``p_rgb * g_v`` (lower is better).

    Args:
        pred_rgb, gt_rgb: Bx3xHxW in [0, 1] (straight colour).
        visible: Bx1xHxW ground-truth visible mask (0/1).
        lpips_fn: see the module docstring (``lpips.LPIPS`` fits).

    Returns:
        B distances (float32). Both images are 0 outside the mask, so LPIPS's spatial mean counts those pixels as
        equal: as in the paper's definition, a small visible region gives a small distance.
    """
    v = _check(pred_rgb, gt_rgb, visible)
    d = lpips_fn(gt_rgb * v * 2.0 - 1.0, pred_rgb * v * 2.0 - 1.0)
    return d.reshape(gt_rgb.shape[0]).float()


@torch.no_grad()
def directional_similarity(
    pred_rgb: torch.Tensor,
    gt_rgb: torch.Tensor,
    visible: torch.Tensor,
    feature_fn: FeatureFn,
    *,
    min_relative_norm: float = 1e-4,
) -> torch.Tensor:
    """S_gen: ``cos(f(g_rgb) - f(g_rgb * g_v), f(p_rgb) - f(g_rgb * g_v))`` (higher is better, in [-1, 1]).

    The direction from the visible part to the ground truth is what completion should add; the score is how well
    the prediction moves the same way. A prediction that adds nothing (its features equal the visible part's), or
    a ground truth that is wholly visible, has no direction and scores 0, not NaN or round-off noise: a
    difference vector shorter than ``min_relative_norm`` times the largest of the three feature norms counts as
    none (raise it for features computed in half precision).

    Args:
        pred_rgb, gt_rgb: Bx3xHxW in [0, 1].
        visible: Bx1xHxW ground-truth visible mask (0/1).
        feature_fn: see the module docstring (a CLIP image encoder's projection for the real score).
        min_relative_norm: below this fraction of the feature norm, a difference vector counts as zero.

    Returns:
        B cosines (float32).
    """
    v = _check(pred_rgb, gt_rgb, visible)
    b = gt_rgb.shape[0]
    feats = feature_fn(torch.cat([gt_rgb, gt_rgb * v, pred_rgb], dim=0)).float()
    if feats.ndim != 2 or feats.shape[0] != 3 * b:
        raise ValueError(
            f"feature_fn returned {tuple(feats.shape)}, expected ({3 * b}, D) for {3 * b} images"
        )
    f_gt, f_vis, f_pred = feats[:b], feats[b : 2 * b], feats[2 * b :]
    target, moved = f_gt - f_vis, f_pred - f_vis
    cos = F.cosine_similarity(target, moved, dim=1, eps=1e-12)
    # A direction within round-off of zero has no meaning (its cosine would be noise): score it 0.
    scale = torch.stack([f_gt.norm(dim=1), f_vis.norm(dim=1), f_pred.norm(dim=1)]).amax(dim=0)
    none = (target.norm(dim=1) <= min_relative_norm * scale) | (
        moved.norm(dim=1) <= min_relative_norm * scale
    )
    return torch.where(none, torch.zeros_like(cos), cos)


def build_lpips(
    net: str = "alex", backbone_state: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """An ``lpips.LPIPS`` network built without any download; eval mode, no gradients.

    The backbone is built randomly initialised (``pnet_rand=True``, nothing fetched); the linear heads are the
    ones the ``lpips`` package ships (loaded by it with ``torch.load``, which defaults to ``weights_only=True``).
    With ``backbone_state`` (the torchvision model's ``state_dict``, keys ``features.N.weight`` ..., e.g. AlexNet
    loaded from the registry; keys outside ``features`` are ignored) the backbone gets real weights; without it the network is a STAND-IN and any score
    it gives must be labelled so.

    Raises:
        ValueError: a backbone key the network does not have, or a backbone parameter it lacks.
    """
    import lpips  # heavy import (torchvision), only where an LPIPS network is built

    with warnings.catch_warnings():
        # lpips still passes torchvision's deprecated `pretrained=False`; it means weights=None, nothing fetched
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if backbone_state is not None:
        # lpips splits torchvision's `features` into slices that keep the original indices: features.3 -> slice2.3
        where = {
            idx: f"{slice_name}.{idx}"
            for slice_name, block in model.net.named_children()
            for idx, _ in block.named_children()
        }
        mapped = {}
        for key, value in backbone_state.items():
            parts = key.split(".")
            if parts[0] != "features":
                continue  # classifier.* and the like: LPIPS uses only the convolutional features
            if len(parts) != 3 or parts[1] not in where:
                raise ValueError(
                    f"build_lpips: backbone key {key!r} is not a {net} `features.N.param` the network uses"
                )
            mapped[f"{where[parts[1]]}.{parts[2]}"] = value
        expected = set(model.net.state_dict())
        missing = sorted(expected - set(mapped))
        if missing:
            raise ValueError(f"build_lpips: backbone state lacks {missing}")
        model.net.load_state_dict(mapped, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
