"""Writing feature-network folders (the format of :mod:`reflade.eval.networks`): converters from the published
checkpoints, and the randomly initialised stand-ins.

The converters run once, on a machine that has the published files (nothing here downloads); their output is then
registered with ``reflade registry import --license ... --source ...``. They read ``.pth``/``.bin`` files with
``torch.load(..., weights_only=True)`` only (tensors and plain containers, never arbitrary pickles), check that the
state dict fits the architecture exactly, and write safetensors plus ``reflade-net.json`` (arch, source, licence,
the source files' sha256).

The stand-ins are deterministic for their seed (``torch.manual_seed`` in a forked RNG, sorted JSON, one
safetensors metadata key), so building and registering again gives identical bytes and the registry returns the
existing versions.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reflade.eval.networks import (
    STAND_IN_REFS,
    WEIGHTS_FILE,
    NetworkError,
    build_fid_inception,
    build_tiny_conv,
    load_strict,
    read_safetensors,
    write_network_spec,
)

if TYPE_CHECKING:  # imported lazily: building folders needs no boto3
    from reflade.platform.registry import Registry

__all__ = [
    "ALEXNET_SOURCE",
    "CLIP_SOURCE",
    "INCEPTION_SOURCE",
    "LICENSE",
    "SOURCE",
    "TINY_CLIP_VISION_CONFIG",
    "TINY_CONV_CONFIG",
    "build_stand_ins",
    "convert_alexnet",
    "convert_clip",
    "convert_inception",
    "register_stand_ins",
]

ALEXNET_SOURCE = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_LICENSE = "BSD-3-Clause (torchvision)"
INCEPTION_SOURCE = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_LICENSE = "Apache-2.0 (pytorch-fid's port of TensorFlow's inception-2015-12-05)"
CLIP_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14"
CLIP_LICENSE = "MIT (OpenAI CLIP)"

LICENSE = "Apache-2.0 (random init, built by RefLade)"
"""Licence of the stand-ins."""
SOURCE = "reflade.eval.network_convert"
"""Source of the stand-ins."""
SEED = 0
TINY_CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
    "projection_dim": 32,
}
"""The stand-in CLIP image encoder: a ViT of 2 blocks of width 32 on 32-px inputs, 32-d embeddings."""
TINY_CONV_CONFIG: dict[str, Any] = {"image_size": 64, "widths": [16, 32, 64]}
"""The stand-in FID network: 3 stride-2 convolutions on 64-px inputs, 64-d features."""

_HASH_SUFFIX = re.compile(r"-([0-9a-f]{8})\.pth$")
"""torch.hub's naming of published checkpoints: the file name ends in its sha256's first 8 hex digits."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_pickled_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a ``.pth``/``.bin`` read with ``weights_only=True``.

    Raises:
        NetworkError: unreadable; holds anything but a mapping of names to tensors; a torch.hub-style name whose
            hash suffix does not match the content (a truncated or replaced download).
    """
    path = Path(path)
    try:
        digest = _sha256(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise NetworkError(f"cannot read {path} as a plain state dict (weights_only=True): {e}") from None
    m = _HASH_SUFFIX.search(path.name)
    if m and not digest.startswith(m[1]):
        raise NetworkError(f"{path}: sha256 {digest[:12]}... does not match the {m[1]} its name promises")
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise NetworkError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state), digest


def _save_state(state: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    from safetensors.torch import save_file

    # one metadata key only: safetensors writes its metadata in hash order, and identical bytes let the registry
    # deduplicate a rebuild
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})


def _alexnet_features_holder() -> nn.Module:
    """A module whose state dict is exactly torchvision AlexNet's ``features.*`` (on the meta device)."""
    from torchvision.models import alexnet

    with torch.device("meta"):
        holder = nn.Module()
        holder.features = alexnet(weights=None).features
    return holder


def convert_alexnet(pth_path: str | Path, out_dir: str | Path) -> Path:
    """Convert torchvision's AlexNet checkpoint into an ``alexnet-features`` folder (LPIPS's backbone).

    Source: ``alexnet-owt-7be5be79.pth`` (:data:`ALEXNET_SOURCE`), torchvision's ImageNet weights, BSD-3-Clause.
    Only ``features.*`` is kept (LPIPS uses the convolutional features: 10 MB of the file's 244).

    Returns:
        ``out_dir`` with ``model.safetensors`` and ``reflade-net.json``.

    Raises:
        NetworkError: an unreadable file; one holding anything but tensors (nothing else is unpickled); a
            torch.hub-style name whose hash suffix disagrees with the content; keys other than AlexNet's (the first
            missing and unexpected ones listed), or shapes that differ.
    """
    out_dir = Path(out_dir)
    state, digest = _load_pickled_state(pth_path)
    holder = _alexnet_features_holder()
    features = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    load_strict(holder, features, f"{pth_path} (AlexNet features)", assign=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_state(holder.state_dict(), out_dir)
    write_network_spec(
        out_dir,
        {
            "network": "lpips",
            "arch": "alexnet-features",
            "config": {},
            "source": ALEXNET_SOURCE,
            "license": ALEXNET_LICENSE,
            "source_sha256": {Path(pth_path).name: digest},
            "random_init": False,
        },
    )
    return out_dir


def convert_inception(pth_path: str | Path, out_dir: str | Path) -> Path:
    """Convert pytorch-fid's Inception checkpoint into an ``inception-v3-fid`` folder.

    Source: ``pt_inception-2015-12-05-6726825d.pth`` (:data:`INCEPTION_SOURCE`), pytorch-fid's port of
    TensorFlow's 2015 Inception graph that published FIDs use; Apache-2.0. The state dict must load strictly into
    :func:`~reflade.eval.networks.build_fid_inception` (the 1008-class head is kept, so the folder holds the whole
    published state).

    Raises:
        NetworkError: as :func:`convert_alexnet`'s, for the FID Inception's keys and shapes.
    """
    out_dir = Path(out_dir)
    state, digest = _load_pickled_state(pth_path)
    with torch.device("meta"):
        model = build_fid_inception()
    # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm step counters; BatchNorm fills them in the same way.
    for key in model.state_dict():
        if key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] + ".running_mean" in state:
            state.setdefault(key, torch.tensor(0, dtype=torch.long))
    load_strict(model, state, f"{pth_path} (FID Inception-v3)", assign=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_state(model.state_dict(), out_dir)
    write_network_spec(
        out_dir,
        {
            "network": "inception",
            "arch": "inception-v3-fid",
            "config": {"image_size": 299},
            "source": INCEPTION_SOURCE,
            "license": INCEPTION_LICENSE,
            "source_sha256": {Path(pth_path).name: digest},
            "random_init": False,
        },
    )
    return out_dir


def _clip_weight_files(src: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index_name).is_file():  # a sharded checkpoint
            weight_map = json.loads((src / index_name).read_text())["weight_map"]
            return [src / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return [src / name]
    raise NetworkError(
        f"{src} holds no model.safetensors or pytorch_model.bin (a CLIPModel folder was expected)"
    )


def convert_clip(src: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face ``CLIPModel`` folder into a ``clip-vision`` folder (image tower + projection).

    Source: ``openai/clip-vit-large-patch14`` (:data:`CLIP_SOURCE`), MIT: a folder with ``config.json`` and
    ``model.safetensors`` or ``pytorch_model.bin`` (sharded ones too). ``config.json``'s ``vision_config`` becomes
    the ``CLIPVisionConfig`` with the top-level ``projection_dim`` (the vision config's own may be a stale
    default). Mean and std come from ``preprocessor_config.json`` when present, else OpenAI's.

    Returns:
        ``out_dir``: ``config.json`` + ``model.safetensors`` (``save_pretrained``) and ``reflade-net.json``.

    Raises:
        NetworkError: no CLIPModel config or weights; weights that do not fit the vision tower (keys listed).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    src, out_dir = Path(src), Path(out_dir)
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise NetworkError(f"{src}: cannot read config.json ({e})") from None
    if "vision_config" not in config or "projection_dim" not in config:
        raise NetworkError(f"{src}/config.json is not a CLIPModel's (no vision_config and projection_dim)")
    vision = CLIPVisionConfig.from_dict(
        {**config["vision_config"], "projection_dim": config["projection_dim"]}
    )
    state: dict[str, torch.Tensor] = {}
    digests = {}
    for path in _clip_weight_files(src):
        if path.suffix == ".safetensors":
            state.update(read_safetensors(path, f"{src} (CLIPModel)"))
            digests[path.name] = _sha256(path)
        else:
            part, digests[path.name] = _load_pickled_state(path)
            state.update(part)
    # The text tower and logit scale are not needed for image features; position_ids is a buffer that older
    # transformers saved and current ones rebuild.
    vision_state = {
        k: v
        for k, v in state.items()
        if k.startswith(("vision_model.", "visual_projection.")) and not k.endswith(".position_ids")
    }
    model = CLIPVisionModelWithProjection(vision).eval()
    load_strict(model, vision_state, f"{src} (CLIP vision tower)")
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if (src / "preprocessor_config.json").is_file():
        pre = json.loads((src / "preprocessor_config.json").read_text())
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_network_spec(
        out_dir,
        {
            "network": "clip",
            "arch": "clip-vision",
            "config": {"image_size": vision.image_size, "mean": list(mean), "std": list(std)},
            "source": CLIP_SOURCE,
            "license": CLIP_LICENSE,
            "source_sha256": digests,
            "random_init": False,
        },
    )
    return out_dir


# ------------------------------------------------------------------------------------------------ stand-ins
def _stand_in_spec(kind: str, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "network": kind,
        "arch": arch,
        "config": config,
        "source": SOURCE,
        "license": LICENSE,
        "random_init": True,
        "seed": SEED,
    }


def _build_alexnet_stand_in(dest: Path) -> None:
    holder = _alexnet_features_holder().to_empty(device="cpu")
    for module in holder.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()  # torchvision's AlexNet uses PyTorch's default init
    _save_state(holder.state_dict(), dest)
    write_network_spec(dest, _stand_in_spec("lpips", "alexnet-features", {}))


def _build_clip_stand_in(dest: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG)).eval()
    model.save_pretrained(dest, safe_serialization=True)
    config = {
        "image_size": TINY_CLIP_VISION_CONFIG["image_size"],
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
    }
    write_network_spec(dest, _stand_in_spec("clip", "clip-vision", config))


def _build_inception_stand_in(dest: Path) -> None:
    _save_state(build_tiny_conv(TINY_CONV_CONFIG).state_dict(), dest)
    write_network_spec(dest, _stand_in_spec("inception", "tiny-conv", TINY_CONV_CONFIG))


_STAND_IN_BUILDERS: dict[str, Callable[[Path], None]] = {
    "lpips": _build_alexnet_stand_in,
    "clip": _build_clip_stand_in,
    "inception": _build_inception_stand_in,
}


def _registry_name(kind: str) -> str:
    return STAND_IN_REFS[kind].split("/", 1)[1]


def build_stand_ins(dest: str | Path) -> dict[str, Path]:
    """Build the three randomly initialised stand-ins into ``dest/<name>/`` (names as in ``STAND_IN_REFS``):
    AlexNet features at full size (LPIPS needs its channel counts; about 10 MB), a tiny CLIP image encoder
    (:data:`TINY_CLIP_VISION_CONFIG`) and the ``tiny-conv`` FID stand-in (:data:`TINY_CONV_CONFIG`, 64-d).

    Returns:
        {kind: folder}, kinds ``lpips``, ``clip``, ``inception``.
    """
    out = {}
    for kind, build in _STAND_IN_BUILDERS.items():
        folder = Path(dest) / _registry_name(kind)
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            torch.manual_seed(SEED)
            build(folder)
        out[kind] = folder
    return out


def register_stand_ins(registry: Registry, *, progress: bool | None = False) -> dict[str, str]:
    """Build the stand-ins in a temporary folder and register each as ``weights/<name>`` with metadata
    ``random_init`` and ``stand_in``; identical content returns the existing versions.

    Returns:
        {kind: exact reference}, e.g. ``{"lpips": "weights/tiny-alexnet@1", "clip": ..., "inception": ...}``.
    """
    out = {}
    with tempfile.TemporaryDirectory(prefix="reflade-stand-ins-") as tmp:
        for kind, folder in build_stand_ins(tmp).items():
            version = registry.create(
                "weights",
                _registry_name(kind),
                folder,
                license=LICENSE,
                source=SOURCE,
                metadata={"random_init": True, "stand_in": True, "seed": SEED, "network": kind},
                progress=progress,
            )
            out[kind] = version.ref
    return out
