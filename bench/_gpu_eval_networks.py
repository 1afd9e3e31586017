"""bench/gpu_eval.py's ``networks`` section: the HPA score's three feature networks at real size (random init, no
download, no registry) in the product's own wrappers, and each one's throughput alone.

- LPIPS-alex: :func:`reflade.eval.features.build_lpips` (the ``lpips`` package's network with a random AlexNet
  backbone, its shipped linear heads), in ``_LPIPSNet``; pairs/s at ``--lpips-size``. Without the ``lpips`` package:
  :func:`alex_distance`, a labelled cost substitute (``lpips_substitute``), and no LPIPS figure;
- CLIP ViT-L/14's vision tower (:data:`CLIP_VIT_L14`; ``--smoke``: the product's tiny stand-in config) in
  ``_CLIPImageNet``; images/s at 224 px;
- FID's Inception-v3 (:func:`reflade.eval.networks.build_fid_inception`, 2048-d pool features) in ``_PoolFeatureNet``;
  images/s at 299 px.

Each wrapper is built from the in-memory module and the spec :func:`reflade.eval.networks.load_network_folder` would
read from a folder's ``reflade-net.json``, and finished as it finishes them (on the device, float32, eval, no grads):
their resize and normalisation are part of the figures. The functions take the running ``EvalCheck`` (its device,
arguments, timer and sections).
"""

from __future__ import annotations

import time
from typing import Any

CLIP_VIT_L14: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
}
"""OpenAI CLIP ViT-L/14's vision tower (the shapes of ``openai/clip-vit-large-patch14``)."""
KEYS = {"lpips": "lpips_alex_512_pairs_per_s", "clip": "clip_vit_l14_images_per_s",
        "inception": "inception_v3_images_per_s"}  # fmt: skip
"""Each network's anchor in ``gpu_eval.ANCHORS``."""


def alex_distance():
    """LPIPS-alex's cost without the ``lpips`` package: torchvision AlexNet features (random init) of both images at
    LPIPS's five ReLU taps, unit-normalised per position, squared difference averaged -> B. NOT LPIPS (no linear
    heads, no scaling layer): a throughput substitute only, labelled ``lpips_substitute`` wherever used."""
    import torch
    from torchvision.models import alexnet

    class AlexDistance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = alexnet(weights=None).features
            self.taps = {1, 4, 7, 9, 11}  # the ReLUs LPIPS's slices end at

        def forward(self, a, b):
            x = torch.cat([a, b])
            total = 0.0
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in self.taps:
                    f = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                    fa, fb = f.chunk(2)
                    total = total + (fa - fb).pow(2).sum(1).mean((1, 2))
                if i == max(self.taps):
                    break
            return total

    return AlexDistance()


def build_networks(check):
    """The three wrappers as a :class:`reflade.eval.networks.FeatureNetworks`; what was built goes to
    ``result["networks"]["build"]``."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from reflade.eval.network_convert import TINY_CLIP_VISION_CONFIG
    from reflade.eval.networks import (
        FeatureNetworks,
        _CLIPImageNet,
        _LPIPSNet,
        _PoolFeatureNet,
        build_fid_inception,
    )

    def finish(net):  # as load_network_folder ends
        net.to(device=check.device)
        net.model.to(dtype=torch.float32)
        return net.eval().requires_grad_(False)

    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())

    torch.manual_seed(0)
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if check.lpips_missing:
        lp, arch = alex_distance(), "lpips_substitute"
    else:
        from reflade.eval.features import build_lpips

        lp, arch = (
            build_lpips("alex"),
            "alexnet-features",
        )  # pnet_rand=True inside: random AlexNet, shipped heads
    lpips_net = finish(
        _LPIPSNet(lp, "lpips", {"network": "lpips", "arch": arch, "config": {}, "random_init": True})
    )
    info["lpips"] = {"arch": arch, "params": count(lp), "substitute": bool(check.lpips_missing)}

    clip_cfg = TINY_CLIP_VISION_CONFIG if check.args.smoke else CLIP_VIT_L14
    with torch.device(check.device):  # random init where it runs (fast on a GPU)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg))
    config = {"image_size": clip_cfg["image_size"], "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    clip_spec = {"network": "clip", "arch": "clip-vision", "config": config, "random_init": True}
    clip_net = finish(_CLIPImageNet(clip, "clip", clip_spec))
    info["clip"] = {
        "arch": "clip-vision",
        "config": "tiny stand-in (reflade.eval.network_convert.TINY_CLIP_VISION_CONFIG)"
        if check.args.smoke
        else "ViT-L/14",
        "vision_config": clip_cfg,
        "attn_implementation": getattr(clip.config, "_attn_implementation", None),
        "params": count(clip),
    }

    with torch.device(check.device):
        inception = build_fid_inception()
    inception.fc = torch.nn.Identity()  # the 2048-d pool features, as load_network_folder does
    inc_spec = {
        "network": "inception",
        "arch": "inception-v3-fid",
        "config": {"image_size": 299},
        "random_init": True,
    }
    inc_net = finish(_PoolFeatureNet(inception, "inception", inc_spec))
    info["inception"] = {"arch": "inception-v3-fid", "params": count(inception)}
    check.sync()
    info["build_s"] = time.perf_counter() - t0
    check.result["networks"]["build"] = info
    print(f"built metric networks in {info['build_s']:.1f} s", flush=True)
    refs = {k: f"random-init:{info[k]['arch']}" for k in ("lpips", "clip", "inception")}
    return FeatureNetworks(
        lpips=lpips_net, clip=clip_net, inception=inc_net, refs=refs, stand_in=True, device=check.device
    )


def measure_networks(check, nets, dtype_name: str) -> None:
    """Each network alone at each of its ``--*-batch`` sizes, random inputs already on the device, under bf16
    autocast for ``bf16`` (as ScoreStage(bf16=True) runs them); the best batch counts. One section per network."""
    import torch

    args = check.args
    out = check.result["networks"].setdefault(dtype_name, {})
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(b: int, side: int, lo: float = 0.0):
        x = torch.rand(b, 3, side, side, generator=g)
        return (x * (1.0 - lo) + lo).to(check.device)  # lo = -1: [-1, 1] (LPIPS's convention)

    cases = [("clip", args.clip_batch, nets.clip.size, "images/s")]
    cases.append(("inception", args.inception_batch, nets.inception.size, "images/s"))
    if not check.lpips_missing:
        cases.insert(0, ("lpips", args.lpips_batch, args.lpips_size, "pairs/s"))
    else:
        out["lpips"] = {"skipped": f"lpips is not importable ({check.lpips_missing})"}
        print(f"{'lpips_alex':<28}{dtype_name:>6}  skipped: lpips is not importable", flush=True)
    bf16 = {"device_type": check.device.type, "dtype": torch.bfloat16, "enabled": dtype_name == "bf16"}
    for name, batches, side, unit in cases:

        def run(name=name, batches=batches, side=side, unit=unit):
            net = getattr(nets, name)
            entry: dict[str, Any] = {"unit": unit, "input_px": side, "batches": {}}
            for b in batches:
                inputs = (rand(b, side, -1.0), rand(b, side, -1.0)) if name == "lpips" else (rand(b, side),)
                with torch.inference_mode(), torch.autocast(**bf16):
                    sec = check.timed(lambda inputs=inputs, net=net: net(*inputs), args.warmup, args.iters)
                entry["batches"][str(b)] = {"s_per_batch": sec, "per_s": b / sec}
            best = max(entry["batches"].items(), key=lambda kv: kv[1]["per_s"])
            entry["batch"], entry["per_s"] = int(best[0]), best[1]["per_s"]
            return entry

        entry = check.section(f"networks_{dtype_name}_{name}", run)
        if entry:
            out[name] = entry
            each = ", ".join(f"b{k}: {v['per_s']:.1f}" for k, v in entry["batches"].items())
            print(
                f"{name:<28}{dtype_name:>6}{entry['batch']:>6}{entry['per_s']:>12.1f} {unit}  ({each})",
                flush=True,
            )
