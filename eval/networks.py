"""The three feature networks of the HPA score (LPIPS's AlexNet, a CLIP image encoder, FID's Inception-v3), loaded
from the registry by reference, never from a hub.

A network version is a folder of safetensors plus ``reflade-net.json`` (:data:`SPEC_FILE`), which names what the
folder holds: ``network`` (``lpips``, ``clip`` or ``inception``), ``arch``, ``config``, ``source``, ``license``,
``random_init``. The layouts, by arch:

- ``alexnet-features`` (lpips): ``model.safetensors`` with torchvision AlexNet's ``features.N.weight/bias``; the
  LPIPS linear heads are the ones the ``lpips`` package ships (see :func:`reflade.eval.features.build_lpips`).
- ``clip-vision`` (clip): a ``CLIPVisionModelWithProjection`` saved with ``save_pretrained`` (``config.json``,
  ``model.safetensors``); ``config`` holds the preprocessing (``image_size``, ``mean``, ``std``).
- ``inception-v3-fid`` (inception): ``model.safetensors``, the state dict of :func:`build_fid_inception` (the
  TF-2015 Inception that published FIDs use); 2048-d pool features of 299-px inputs.
- ``tiny-conv`` (inception): ``model.safetensors`` of :func:`build_tiny_conv` (``config``: ``image_size``,
  ``widths``); only the stand-in uses it (a random 2048-d Inception with few samples has singular covariances).

Folders are written by :mod:`reflade.eval.network_convert` (converters from the published checkpoints, and the
randomly initialised stand-ins). Scores computed with any stand-in are labelled: :attr:`FeatureNetworks.stand_in`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
    inception_v3,
)

from reflade.eval.config import STAND_IN_NETWORKS
from reflade.eval.features import FeatureFn, LPIPSFn, build_lpips
from reflade.platform.errors import ReportedError

if TYPE_CHECKING:  # imported lazily: loading a folder needs no boto3
    from reflade.platform.registry import Registry

__all__ = [
    "ARCHS",
    "SPEC_FILE",
    "STAND_IN_REFS",
    "WEIGHTS_FILE",
    "FeatureNetworks",
    "LoadedNetwork",
    "NetworkError",
    "build_fid_inception",
    "build_tiny_conv",
    "load_feature_networks",
    "load_network_folder",
    "load_strict",
    "read_network_spec",
    "read_safetensors",
    "write_network_spec",
]

SPEC_FILE = "reflade-net.json"
"""The file that says what a network folder holds."""
SPEC_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
ARCHS: dict[str, tuple[str, ...]] = {
    "lpips": ("alexnet-features",),
    "clip": ("clip-vision",),
    "inception": ("inception-v3-fid", "tiny-conv"),
}
"""The archs each network kind may load."""
STAND_IN_REFS: dict[str, str] = STAND_IN_NETWORKS
"""Registry names of the randomly initialised stand-ins (:func:`reflade.eval.network_convert.register_stand_ins`);
defined with the ``eval`` section (``reflade.eval.config.STAND_IN_NETWORKS``), one place for the fact."""


class NetworkError(ReportedError, ValueError):
    """A network folder or checkpoint that cannot be loaded as the feature network asked for."""


# ------------------------------------------------------------------------------------------ FID Inception-v3
# The Inception that published FIDs use (TF's 2015 graph, as pytorch-fid ports it) differs from torchvision's in
# its branch pools only: average pools leave the padding out of the mean, and the last block pools by maximum.
# The parameters are the same, so these subclasses replace `_forward` and nothing else.
def _avg_pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class _FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_without_padding(x)),
        ]


class _FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(
                x,
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ),
            self.branch_pool(_avg_pool_without_padding(x)),
        ]


class _FIDInceptionE(InceptionE):
    pool = staticmethod(_avg_pool_without_padding)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        dbl = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
            self.branch_pool(self.pool(x)),
        ]


class _FIDInceptionEMaxPool(_FIDInceptionE):
    pool = staticmethod(_max_pool)


def build_fid_inception() -> Inception3:
    """FID's Inception-v3: torchvision's ``inception_v3`` (no aux head, 1008 classes as TF's graph had) with the FID
    variant's branch pools (see the comment above). Default PyTorch init (random); build it under
    ``torch.device("meta")`` to load a state dict with ``assign=True``.

    Returns:
        An ``Inception3`` whose ``state_dict`` keys are exactly torchvision's for those arguments.
    """
    blocks = [
        BasicConv2d,
        _FIDInceptionA,
        InceptionB,
        _FIDInceptionC,
        InceptionD,
        _FIDInceptionE,
        InceptionAux,
    ]
    model = inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008, inception_blocks=blocks
    )
    model.Mixed_7c = _FIDInceptionEMaxPool(2048)
    return model


def build_tiny_conv(config: dict[str, Any]) -> nn.Sequential:
    """The stand-in feature net: per ``config["widths"]`` a 3x3 stride-2 convolution and a GELU, then a global
    average pool. Input Bx3xHxW, output Bx``widths[-1]``."""
    layers: list[nn.Module] = []
    channels = 3
    for width in config["widths"]:
        layers += [nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------------------- folder format
def write_network_spec(folder: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write ``spec`` (``network``, ``arch``, ``config``, ``source``, ``license``, ``random_init``, ...) as the
    folder's :data:`SPEC_FILE`, sorted so that identical content gives identical bytes. Returns its path."""
    path = Path(folder) / SPEC_FILE
    path.write_text(json.dumps({"format": SPEC_FORMAT, **spec}, indent=1, sort_keys=True) + "\n")
    return path


def read_network_spec(kind: str, folder: str | os.PathLike, ref: str | None = None) -> dict[str, Any]:
    """The :data:`SPEC_FILE` of ``folder``, checked to describe a ``kind`` network (``lpips``, ``clip``,
    ``inception``).

    Raises:
        NetworkError: no spec, unreadable spec, another format, or an arch that ``kind`` does not load.
    """
    if kind not in ARCHS:
        raise NetworkError(f"unknown feature network {kind!r} (known: {', '.join(ARCHS)})")
    what = f"{ref} ({folder})" if ref else str(folder)
    expected = f"a {kind} network of arch {' or '.join(map(repr, ARCHS[kind]))}"
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise NetworkError(
            f"{what} has no {SPEC_FILE}: expected {expected}, as written by reflade.eval.network_convert "
            "(convert_alexnet / convert_clip / convert_inception, or the stand-ins)"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NetworkError(f"{what}: {SPEC_FILE} is not readable JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else spec
        raise NetworkError(f"{what}: {SPEC_FILE} has format {got!r}, expected {SPEC_FORMAT}")
    if spec.get("arch") not in ARCHS[kind]:
        raise NetworkError(
            f"{what} holds arch {spec.get('arch')!r} (network {spec.get('network')!r}): expected {expected}"
        )
    return spec


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU; an unreadable file raises :class:`NetworkError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as e:
        raise NetworkError(f"{what}: cannot read {path.name} ({e})") from None


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str, *, assign: bool = False) -> None:
    """``model.load_state_dict(state, strict=True)``, with a mismatch raised as a :class:`NetworkError` that names
    the first few missing and unexpected keys (or the shape error)."""
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise NetworkError(
            f"{what}: the state dict does not fit {type(model).__name__} "
            f"({len(missing)} missing: {missing[:5]}; {len(unexpected)} unexpected: {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:  # shapes that disagree
        raise NetworkError(f"{what}: the state dict does not fit {type(model).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ callables
class LoadedNetwork(nn.Module):
    """A feature network loaded from a folder (``model``, its ``kind`` and ``spec``). Inputs may be on any device:
    they go to the network's (``.to()`` moves it) and the result comes back on the input's device, as float32.
    No gradients."""

    def __init__(self, model: nn.Module, kind: str, spec: dict[str, Any]):
        super().__init__()
        self.model, self.kind, self.spec = model, kind, spec

    @property
    def arch(self) -> str:
        return self.spec["arch"]

    @property
    def random_init(self) -> bool:
        """True for a randomly initialised (stand-in) network."""
        return bool(self.spec.get("random_init"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.kind}: expected Bx3xHxW images, got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)


class _LPIPSNet(LoadedNetwork):
    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: Bx3xHxW in [-1, 1] -> B distances."""
        d = self.model(self._prepare(a).to(self.dtype), self._prepare(b).to(self.dtype))
        return d.reshape(a.shape[0]).float().to(a.device)


class _CLIPImageNet(LoadedNetwork):
    def __init__(self, *args: Any):
        super().__init__(*args)
        cfg = self.spec["config"]
        self.size = int(cfg["image_size"])
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW in [0, 1] -> BxD ``image_embeds``."""
        x = F.interpolate(self._prepare(images), size=(self.size, self.size), mode="bicubic", antialias=True)
        # bicubic overshoots; CLIP's own preprocessing resizes 8-bit images, which clamps
        x = (x.clamp(0.0, 1.0) - self.mean) / self.std
        return self.model(pixel_values=x.to(self.dtype)).image_embeds.float().to(images.device)


class _PoolFeatureNet(LoadedNetwork):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self.size = int(self.spec["config"]["image_size"])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW in [0, 1] -> BxD pool features."""
        # FID's preprocessing: bilinear resize to the network's size, then [0, 1] -> [-1, 1]
        x = F.interpolate(
            self._prepare(images), size=(self.size, self.size), mode="bilinear", align_corners=False
        )
        return self.model((x * 2.0 - 1.0).to(self.dtype)).float().to(images.device)


def load_network_folder(
    kind: str,
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    ref: str | None = None,
) -> LoadedNetwork:
    """Load the ``kind`` feature network (``lpips``, ``clip`` or ``inception``) stored in ``folder``.

    Args:
        folder: a network folder (module docstring), e.g. a registry version fetched with ``fetch_weights``.
        device, dtype: where and in which precision the network runs.
        ref: the registry reference, named in errors.

    Returns:
        A callable module: for ``lpips`` ``(a, b) -> B`` with a, b Bx3xHxW in [-1, 1]; for ``clip`` and
        ``inception`` ``images -> BxD`` float32 with images Bx3xHxW in [0, 1] (CLIP: D = projection dim;
        ``inception-v3-fid``: 2048; ``tiny-conv``: its last width).

    Raises:
        NetworkError: see :func:`read_network_spec`; missing or unreadable weights; keys or shapes that do not fit.
    """
    folder = Path(folder)
    spec = read_network_spec(kind, folder, ref)
    what = f"{ref} ({folder})" if ref else str(folder)
    device = torch.device(device)
    arch = spec["arch"]
    if arch == "clip-vision":
        from transformers import CLIPVisionModelWithProjection

        try:
            model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise NetworkError(f"{what}: cannot load the CLIP vision model ({e})") from None
        if model.config.image_size != spec["config"]["image_size"]:
            raise NetworkError(
                f"{what}: {SPEC_FILE} says image_size {spec['config']['image_size']}, "
                f"config.json {model.config.image_size}"
            )
        net: LoadedNetwork = _CLIPImageNet(model, kind, spec)
    else:
        state = read_safetensors(folder / WEIGHTS_FILE, what)
        if arch == "alexnet-features":
            try:
                model = build_lpips("alex", backbone_state=state)
            except (ValueError, RuntimeError) as e:  # unknown keys; shapes that disagree
                raise NetworkError(f"{what}: {e}") from None
            net = _LPIPSNet(model, kind, spec)
        else:
            with torch.device("meta"):  # no random init: every tensor comes from the file
                model = (
                    build_fid_inception() if arch == "inception-v3-fid" else build_tiny_conv(spec["config"])
                )
            load_strict(model, state, f"{what} (arch {arch})", assign=True)
            if arch == "inception-v3-fid":
                model.fc = nn.Identity()  # the 2048-d pool features, not TF's 1008 logits
            net = _PoolFeatureNet(model, kind, spec)
    net.to(device=device)
    net.model.to(dtype=dtype)  # the preprocessing buffers stay float32
    net.eval().requires_grad_(False)
    return net


# ------------------------------------------------------------------------------------------- from the registry
@dataclass
class FeatureNetworks:
    """The three networks of the HPA score, each on :attr:`device`."""

    lpips: LPIPSFn
    """``(a, b) -> B`` LPIPS distances, a and b Bx3xHxW in [-1, 1]."""
    clip: FeatureFn
    """``images -> BxD`` CLIP image embeddings (float32), images Bx3xHxW in [0, 1]."""
    inception: FeatureFn
    """``images -> BxD`` FID features (float32), images Bx3xHxW in [0, 1]."""
    refs: dict[str, str] = field(default_factory=dict)
    """Exact registry references, keys ``lpips``, ``clip``, ``inception``."""
    stand_in: bool = False
    """True when any network is randomly initialised: scores must be labelled so, never compared with real ones."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the networks run (inputs may come from anywhere; results go back to the input's device)."""


def load_feature_networks(
    registry: Registry,
    *,
    lpips_ref: str,
    clip_ref: str,
    inception_ref: str,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> FeatureNetworks:
    """Fetch the three network versions into the local weights cache and load them.

    A network counts as a stand-in when its version's metadata or its folder's spec says ``random_init``.

    Args:
        registry: where the references resolve.
        lpips_ref, clip_ref, inception_ref: references, e.g. ``weights/tiny-alexnet@latest`` (see
            :data:`STAND_IN_REFS`); resolved once, so an alias that moves meanwhile cannot mix versions.
        device, dtype: where and in which precision the networks run.
        cache_dir: the weights cache's root (None: :func:`reflade.platform.weights.default_cache_dir`).

    Raises:
        RegistryError: a malformed or unknown reference.
        NetworkError: a version that is not the network asked for (see :func:`load_network_folder`).
    """
    from reflade.platform.weights import fetch_weights

    nets: dict[str, LoadedNetwork] = {}
    refs: dict[str, str] = {}
    stand_in = False
    for kind, ref in (("lpips", lpips_ref), ("clip", clip_ref), ("inception", inception_ref)):
        version = registry.resolve(ref)
        local = fetch_weights(registry, version.ref, cache_dir)
        nets[kind] = load_network_folder(kind, local.path, device, dtype=dtype, ref=version.ref)
        refs[kind] = version.ref
        stand_in |= bool(version.metadata.get("random_init")) or nets[kind].random_init
    return FeatureNetworks(
        lpips=nets["lpips"],
        clip=nets["clip"],
        inception=nets["inception"],
        refs=refs,
        stand_in=stand_in,
        device=torch.device(device),
    )
