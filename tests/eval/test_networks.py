"""Feature networks: converters from the published checkpoint formats (round trips against the source models), the
FID Inception variant, refused checkpoints and folders, the stand-ins, and loading all three from the registry."""

from __future__ import annotations

import collections
import copy
import functools
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

from reflade.eval.features import build_lpips, lpips_visible
from reflade.eval.network_convert import (
    ALEXNET_SOURCE,
    CLIP_SOURCE,
    INCEPTION_SOURCE,
    LICENSE,
    TINY_CONV_CONFIG,
    build_stand_ins,
    convert_alexnet,
    convert_clip,
    convert_inception,
    register_stand_ins,
)
from reflade.eval.networks import (
    SPEC_FILE,
    STAND_IN_REFS,
    NetworkError,
    build_fid_inception,
    load_feature_networks,
    load_network_folder,
    read_network_spec,
    write_network_spec,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(seed: int, shape=(2, 3, 48, 40)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def alexnet_source(tmp_path_factory):
    """A random torchvision AlexNet saved as its published checkpoint is: the whole state dict in a .pth."""
    torch.manual_seed(1)
    state = torchvision.models.alexnet(weights=None).state_dict()
    pth = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    torch.save(state, pth)
    return pth, state


@pytest.fixture(scope="module")
def clip_source(tmp_path_factory):
    """A tiny CLIPModel (text and vision) saved with save_pretrained, as the published folder is."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 62,
            "eos_token_id": 63,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,  # not the vision config's default (512): the converter must take the top-level one
    )
    torch.manual_seed(2)
    model = CLIPModel(config).eval()
    src = tmp_path_factory.mktemp("clip-published")
    model.save_pretrained(src, safe_serialization=True)
    return src, model


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return build_stand_ins(tmp_path_factory.mktemp("stand-ins"))


# ------------------------------------------------------------------------------------------- converters
def test_convert_alexnet_round_trip(alexnet_source, tmp_path):
    pth, state = alexnet_source
    out = convert_alexnet(pth, tmp_path / "alexnet")
    spec = read_network_spec("lpips", out)
    assert spec["arch"] == "alexnet-features" and spec["source"] == ALEXNET_SOURCE
    assert spec["license"].startswith("BSD-3-Clause") and spec["random_init"] is False
    assert len(spec["source_sha256"]["alexnet.pth"]) == 64
    from safetensors.torch import load_file

    stored = load_file(out / "model.safetensors")
    assert set(stored) == {k for k in state if k.startswith("features.")}  # the classifier is dropped

    net = load_network_folder("lpips", out)
    a, b = _images(3) * 2 - 1, _images(4) * 2 - 1
    expected = build_lpips("alex", backbone_state=state)(a, b).reshape(2)
    got = net(a, b)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the weights really came from the file: a freshly initialised backbone gives other distances
    assert not torch.allclose(got, build_lpips("alex")(a, b).reshape(2), atol=1e-4)


def _fid_preprocess(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1


def test_convert_inception_round_trip_and_fid_variant(tmp_path):
    torch.manual_seed(5)
    source = build_fid_inception().eval()
    # He init keeps the activations of 94 random convolutions near unit scale (PyTorch's default shrinks them to
    # 1e-7, where any two outputs are close in absolute terms)
    for module in source.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = source.state_dict()
    pth = tmp_path / "pt_inception.pth"
    # as saved before PyTorch 0.4.1: no BatchNorm step counters (the converter adds them)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, pth)
    out = convert_inception(pth, tmp_path / "inception")
    spec = read_network_spec("inception", out)
    assert spec["arch"] == "inception-v3-fid" and spec["source"] == INCEPTION_SOURCE
    assert spec["config"] == {"image_size": 299} and "Apache-2.0" in spec["license"]

    net = load_network_folder("inception", out)
    x = _images(6)
    got = net(x)
    assert got.shape == (2, 2048) and got.dtype == torch.float32
    assert 0.1 < got.abs().max() < 1e3
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = source(_fid_preprocess(x))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # the same parameters in torchvision's own Inception give other features: the FID pools are in effect
    plain = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    plain.load_state_dict(state, strict=True)
    plain.fc = torch.nn.Identity()
    with torch.no_grad():
        plain_features = plain.eval()(_fid_preprocess(x))
    assert (plain_features - got).norm() > 0.01 * got.norm()
    # block by block: the other branches are torchvision's, and the branch pool (the last channels) averages
    # without the padding, except in the last block, which takes the maximum
    avg = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    top = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)
    for name, tv_class, pool in (
        ("Mixed_5b", InceptionA, avg),
        ("Mixed_6b", InceptionC, avg),
        ("Mixed_7b", InceptionE, avg),
        ("Mixed_7c", InceptionE, top),
    ):
        block = getattr(source, name)
        tv_block = copy.deepcopy(block)
        tv_block.__class__ = tv_class
        h = torch.randn(1, block.branch1x1.conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(0))
        n_pool = block.branch_pool.conv.out_channels
        with torch.no_grad():
            out, out_tv = block(h), tv_block(h)
            torch.testing.assert_close(out[:, :-n_pool], out_tv[:, :-n_pool], msg=name)
            torch.testing.assert_close(out[:, -n_pool:], block.branch_pool(pool(h)), msg=name)
            assert not torch.allclose(out[:, -n_pool:], out_tv[:, -n_pool:]), name


def test_convert_clip_round_trip(clip_source, tmp_path):
    src, model = clip_source
    out = convert_clip(src, tmp_path / "clip")
    spec = read_network_spec("clip", out)
    assert (
        spec["arch"] == "clip-vision" and spec["source"] == CLIP_SOURCE and spec["license"].startswith("MIT")
    )
    assert spec["config"]["image_size"] == 32
    assert set(spec["source_sha256"]) == {"model.safetensors"}
    assert not any("text" in k for k in json.loads((out / "config.json").read_text()))

    net = load_network_folder("clip", out)
    x = _images(7)
    mean = torch.tensor(spec["config"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["config"]["std"]).view(1, 3, 1, 1)
    pixels = (F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1) - mean) / std
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    got = net(x)
    assert got.shape == (2, 24)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # an older checkpoint: pytorch_model.bin with position_ids buffers, and its own preprocessing facts
    old = tmp_path / "clip-bin"
    old.mkdir()
    shutil.copy(src / "config.json", old / "config.json")
    state = dict(model.state_dict())
    state["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    torch.save(state, old / "pytorch_model.bin")
    (old / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    out_old = convert_clip(old, tmp_path / "clip-from-bin")
    assert read_network_spec("clip", out_old)["config"]["mean"] == [0.5] * 3
    pixels = (F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1) - 0.5) / 0.25
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(load_network_folder("clip", out_old)(x), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- refusals
class _NotATensor:
    pass


def test_bad_checkpoints_are_refused_with_their_keys(alexnet_source, tmp_path):
    state = {k: v for k, v in alexnet_source[1].items() if k.startswith("features.")}  # small files
    wrong = {k: v for k, v in state.items() if k != "features.3.weight"}
    wrong["extra.weight"] = torch.zeros(1)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(
        NetworkError, match=r"missing: \['features\.3\.weight'\].*unexpected: \['extra\.weight'\]"
    ):
        convert_alexnet(tmp_path / "wrong.pth", tmp_path / "out")
    # an AlexNet checkpoint is not an Inception: the error names Inception's keys it lacks
    with pytest.raises(NetworkError, match=r"FID Inception-v3.*Conv2d_1a_3x3\.bn\.bias"):
        convert_inception(tmp_path / "wrong.pth", tmp_path / "out")
    shaped = dict(state, **{"features.0.weight": torch.zeros(32, 3, 11, 11)})
    torch.save(shaped, tmp_path / "shaped.pth")
    with pytest.raises(NetworkError, match=r"size mismatch for features\.0\.weight"):
        convert_alexnet(tmp_path / "shaped.pth", tmp_path / "out")
    # never an arbitrary pickle
    torch.save({"features.0.weight": _NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(NetworkError, match="weights_only=True"):
        convert_alexnet(tmp_path / "pickle.pth", tmp_path / "out")
    torch.save(collections.OrderedDict(a=1), tmp_path / "ints.pth")
    with pytest.raises(NetworkError, match="does not hold a state dict"):
        convert_alexnet(tmp_path / "ints.pth", tmp_path / "out")
    # a published name whose content is not the published file (truncated or replaced download)
    shutil.copy(tmp_path / "shaped.pth", tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(NetworkError, match="does not match the 7be5be79"):
        convert_alexnet(tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "out")
    assert not (tmp_path / "out" / SPEC_FILE).exists()


def test_bad_folders_are_refused(stand_ins, tmp_path):
    with pytest.raises(
        NetworkError, match=r"weights/x@1 .* has no reflade-net\.json: expected a lpips network"
    ):
        load_network_folder("lpips", tmp_path, ref="weights/x@1")
    write_network_spec(tmp_path, {"network": "inception", "arch": "resnet-50", "config": {}})
    with pytest.raises(NetworkError, match=r"arch 'resnet-50'.*expected .*'inception-v3-fid' or 'tiny-conv'"):
        load_network_folder("inception", tmp_path)
    with pytest.raises(NetworkError, match=r"arch 'clip-vision'.*expected a lpips network"):
        load_network_folder("lpips", stand_ins["clip"])
    (tmp_path / SPEC_FILE).write_text(json.dumps({"format": 99, "arch": "tiny-conv"}))
    with pytest.raises(NetworkError, match="format 99, expected 1"):
        load_network_folder("inception", tmp_path)
    # a spec that promises weights the folder does not hold
    write_network_spec(tmp_path, {"network": "inception", "arch": "tiny-conv", "config": TINY_CONV_CONFIG})
    with pytest.raises(NetworkError, match="cannot read model.safetensors"):
        load_network_folder("inception", tmp_path)
    shutil.copy(stand_ins["lpips"] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(
        NetworkError, match=r"tiny-conv.*missing: \['0\.bias'.*unexpected: \['features\.0\.bias'"
    ):
        load_network_folder("inception", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NetworkError, match="not a CLIPModel's"):
        convert_clip(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------- stand-ins
def test_stand_ins_are_deterministic_and_load(stand_ins, tmp_path):
    rng = torch.get_rng_state()
    again = build_stand_ins(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    for kind, folder in stand_ins.items():
        assert folder.name == STAND_IN_REFS[kind].split("/")[1]
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted(p.name for p in again[kind].iterdir())
        assert not any(f.endswith((".bin", ".pth", ".pt")) for f in files)
        for name in files:
            assert (folder / name).read_bytes() == (again[kind] / name).read_bytes(), f"{kind}/{name}"
        spec = read_network_spec(kind, folder)
        assert spec["random_init"] is True and spec["license"] == LICENSE
    size = {kind: sum(p.stat().st_size for p in f.iterdir()) for kind, f in stand_ins.items()}
    assert 9_000_000 < size["lpips"] < 11_000_000 and size["clip"] < 500_000 and size["inception"] < 500_000

    nets = {kind: load_network_folder(kind, folder) for kind, folder in stand_ins.items()}
    assert all(n.random_init for n in nets.values())
    x, y = _images(8, (3, 3, 40, 56)), _images(9, (3, 3, 40, 56))
    assert nets["inception"](x).shape == (3, 64) and nets["clip"](x).shape == (3, 32)
    assert nets["inception"](x).dtype == nets["clip"](x).dtype == torch.float32
    d_same, d_other = nets["lpips"](x * 2 - 1, x * 2 - 1), nets["lpips"](x * 2 - 1, y * 2 - 1)
    assert d_same.abs().max() == 0 and (d_other > 1e-3).all()
    vis = torch.ones(3, 1, 40, 56)
    assert lpips_visible(x, x, vis, nets["lpips"]).abs().max() == 0
    # another precision: same results within its rounding, still returned as float32
    clip64 = load_network_folder("clip", stand_ins["clip"], dtype=torch.float64)
    assert clip64.dtype == torch.float64 and clip64.device == torch.device("cpu")
    assert clip64(x).dtype == torch.float32
    torch.testing.assert_close(clip64(x), nets["clip"](x), rtol=1e-4, atol=1e-5)
    # the stand-ins tell images apart
    assert not torch.allclose(nets["inception"](x), nets["inception"](y), atol=1e-4)
    assert not torch.allclose(nets["clip"](x), nets["clip"](y), atol=1e-4)


# ------------------------------------------------------------------------------------------- registry
def test_load_feature_networks_from_the_registry(registry, stand_ins, alexnet_source, clip_source, tmp_path):
    refs = register_stand_ins(registry)
    assert refs == {kind: f"{name}@1" for kind, name in STAND_IN_REFS.items()}
    v = registry.resolve(refs["clip"])
    assert v.metadata["random_init"] is True and v.metadata["stand_in"] is True
    assert v.manifest["license"] == LICENSE
    nets = load_feature_networks(
        registry,
        lpips_ref=STAND_IN_REFS["lpips"],
        clip_ref=STAND_IN_REFS["clip"],
        inception_ref=STAND_IN_REFS["inception"] + "@latest",
        cache_dir=tmp_path / "cache",
    )
    assert nets.refs == refs and nets.stand_in is True and nets.device == torch.device("cpu")
    x = _images(10)
    assert nets.inception(x).shape == (2, 64) and nets.clip(x).shape == (2, 32)
    assert nets.lpips(x, x).abs().max() == 0
    # building and registering again: identical bytes, the same versions
    assert register_stand_ins(registry) == refs
    assert all(registry.versions("weights", n.split("/")[1]) == [1] for n in STAND_IN_REFS.values())

    # networks that are not random: no stand-in label ...
    alex = convert_alexnet(alexnet_source[0], tmp_path / "alexnet")
    clip = convert_clip(clip_source[0], tmp_path / "clip")
    conv = shutil.copytree(stand_ins["inception"], tmp_path / "conv")
    write_network_spec(conv, {**read_network_spec("inception", conv), "random_init": False})
    real = {
        "lpips": registry.create("weights", "alexnet", alex, progress=False).ref,
        "clip": registry.create("weights", "clip", clip, progress=False).ref,
        "inception": registry.create("weights", "conv", conv, progress=False).ref,
    }
    args = {f"{k}_ref": r for k, r in real.items()}
    nets = load_feature_networks(registry, **args, cache_dir=tmp_path / "cache")
    assert nets.stand_in is False and nets.refs == real
    # ... but one version whose metadata says random_init labels them all
    flagged = registry.create("weights", "conv-flagged", conv, metadata={"random_init": True}, progress=False)
    nets = load_feature_networks(
        registry, **{**args, "inception_ref": flagged.ref}, cache_dir=tmp_path / "cache"
    )
    assert nets.stand_in is True
    # and a version that is not the network asked for is refused with its reference
    with pytest.raises(NetworkError, match=r"weights/clip@1 .*expected a lpips network"):
        load_feature_networks(registry, **{**args, "lpips_ref": real["clip"]}, cache_dir=tmp_path / "cache")
