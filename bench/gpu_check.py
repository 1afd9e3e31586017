"""GPU check of RefLayer: its training step and one decomposition at real size, beside the bare SD3 transformer.

One script for one CUDA GPU that needs neither Ray nor the object store. ``build_reflayer("sd3-medium")`` with
random weights (no download: the SD3-medium transformer and VAE shapes, a seeded random stand-in for the text
encoders giving 333 x 4096 hidden states and a 2048-wide pooled vector), then:

- ``train_<px>[_gc]``: RefLayer's training step, the very function the Ray Train loop calls
  (:func:`reflade.train.step.train_step` over a :class:`~reflade.train.step.PhaseLoss`, transformer phase,
  bf16 autocast, AdamW (fused on CUDA) as :func:`~reflade.train.step.make_optimizer` builds it), as a plain
  loop over latents precomputed once by :func:`~reflade.train.losses.encode_batch` (the cached-latents path);
  ``_gc`` with gradient checkpointing;
- ``bare_<px>[_gc]``: the same at the same batch for the bare ``SD3Transformer2DModel`` inside the bundle (the
  same weights, its own fused AdamW, velocity MSE on the same latents): the ratio RefLayer / bare comes from one
  run on one card;
- ``vae_encode_<px>``, ``vae_decode_<px>``: the frozen VAE alone, batch 1;
- ``bare_sample_<px>``: ``--sample-steps`` transformer steps at batch 1 (the sampling loop's cost alone);
- ``decompose_<px>_cfg<g>``: one whole decomposition through the platform's API, :meth:`RefLayerPipeline.decompose`
  (a uint8 image at the model's size, a box and a point, kind ``foreground``: the prompt drawn, image and canvas
  encoded, the sampling steps, RGB and alpha decoders, the 8-bit layer) at guidance 1 (conditional only) and at
  guidance > 1
  (conditional and unconditional as one batch of two), with ``stages_s``: three more calls through
  ``RefLayerPipeline(record_stages=True)`` (the GPU synchronised at each stage boundary), medians of encode,
  sample, decode_rgb, decode_alpha and finish.
  ``--infer-variants`` repeats the inference cases under other settings: ``cudnn`` (``cudnn.benchmark``), ``cl``
  (VAE and alpha decoder channels-last), ``cudnn+cl``; their case names get the variant as a suffix.
  On CUDA the inference cases run twice: with the float32 training weights under bf16 autocast, then (suffix
  ``_bf16w``) with the weights cast to bf16 (``RefLayerBundle.to(dtype=torch.bfloat16)``), as serving runs them:
  autocast caches no casts for weights that need no gradient, so float32 weights are cast again at every step.

Each case: warm-up iterations (excluded), then timed ones with the GPU synchronised around the timer; peak GPU
memory is reset before each case. The JSON (``--out``) is rewritten after every case, so a later failure (an
out-of-memory, a crash, a timeout) keeps the figures already measured; a failed case records its error and the
others still run.

Presets: ``sd3-medium`` (default on CUDA: 512 px and 1024 px) and ``tiny`` (the tiny configuration with a
random tiny VAE at 64 and 128 px, MiniLM text encoder: the whole script on a CPU in seconds, covered by a test).

    python bench/gpu_check.py                               # sd3-medium on the GPU
    python bench/gpu_check.py --preset tiny --device cpu    # the CPU smoke run

Imports torch, diffusers, transformers (tiny: MiniLM), numpy, OpenCV and pyarrow (through reflade.engine.schema),
never ray or boto3 (``forbidden_modules`` in the JSON). Without an installed ``reflade`` package the modules are
imported from this source tree.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FORBIDDEN = ("ray", "boto3", "botocore")

# (resolution, batch, gradient checkpointing) of the training cases per preset. sd3-medium follows the anchor's
# settings: batch 8 at 512 px without checkpointing, 32 with; batch 8 at 1024 px with checkpointing.
TRAIN_CASES = {
    "sd3-medium": [(512, 8, False), (512, 32, True), (1024, 8, True)],
    "tiny": [(64, 8, False), (64, 16, True), (128, 4, True)],
}
SAMPLE_RES = {"sd3-medium": 1024, "tiny": 128}


def ensure_reflade() -> str:
    """Make ``reflade.train`` importable: the installed package, else this source tree."""
    try:
        importlib.import_module("reflade.train.model")
        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "reflade" or m.startswith("reflade.")]:
        del sys.modules[name]
    pkg = types.ModuleType("reflade")
    pkg.__path__ = [str(ROOT)]  # reflade.train -> ROOT/train, as [tool.setuptools.package-dir] maps it
    sys.modules["reflade"] = pkg
    importlib.import_module("reflade.train.model")
    return f"source tree {ROOT}"


def forbidden_modules() -> list[str]:
    return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN})


class Check:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.result: dict[str, Any] = {
            "script": "bench/gpu_check.py",
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "preset": args.preset,
            "device": device_info(self.device),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "cases": {},
            "errors": {},
        }

    # ------------------------------------------------------------------ bookkeeping
    def save(self) -> None:
        self.result["forbidden_modules"] = forbidden_modules()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30

    def case(self, name: str, fn) -> None:
        """Run one case; record its figures or its error, and save the JSON either way."""
        if self.args.only and not any(name.startswith(o) for o in self.args.only):
            return
        self.reset_peak()
        t0 = time.perf_counter()
        try:
            entry = fn()
            entry["peak_gib"] = self.peak_gib()
            entry["case_wall_s"] = time.perf_counter() - t0
            self.result["cases"][name] = entry
            print(f"{name:<36} {_summary(entry)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failed case must not lose the others
            msg = f"{type(exc).__name__}: {exc}"
            self.result["errors"][name] = {"error": msg[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(f"{name:<24} FAILED {msg[:300]}", flush=True)
            if self.cuda:
                self.torch.cuda.empty_cache()
        self.save()

    def timed(self, fn, warmup: int, iters: int) -> float:
        """Seconds per call of ``fn`` (mean over ``iters`` after ``warmup`` calls)."""
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / iters

    # ------------------------------------------------------------------ building
    def build(self):
        torch = self.torch
        from reflade.train.model import build_reflayer, count_parameters

        t0 = time.perf_counter()
        if self.args.preset == "tiny":
            from reflade.train.vae import build_tiny_vae

            overrides = {"num_layers": self.args.layers} if self.args.layers else {}
            bundle = build_reflayer(
                "tiny", vae=build_tiny_vae(seed=0), resolution=self.args.sample_res, **overrides
            )
            bundle.to(self.device)
        else:
            # Initialise on the GPU directly: drawing 2 B random weights on the CPU takes a minute.
            overrides = {"num_layers": self.args.layers} if self.args.layers else {}
            with torch.device(self.device):
                bundle = build_reflayer("sd3-medium", resolution=self.args.sample_res, **overrides)
            bundle.to(self.device)
        self.sync()
        self.result["build"] = {
            "seconds": time.perf_counter() - t0,
            "params_transformer": count_parameters(bundle.model.transformer),
            "params_reflayer": count_parameters(bundle.model),
            "params_trainable_transformer_phase": sum(
                p.numel() for p in bundle.model.phase_parameters("transformer")
            ),
            "params_alpha_decoder": count_parameters(bundle.model.alpha_decoder),
            "params_vae": count_parameters(bundle.vae),
            "text_tokens": int(bundle.text_encoder.encode(["x"])[0].shape[1]),
        }
        print(f"built {self.args.preset}: {json.dumps(self.result['build'])}", flush=True)
        self.save()
        return bundle

    def latents(self, bundle, res: int, batch: int) -> dict[str, Any]:
        """Precomputed latents of ``batch`` random images, layers and canvases at ``res`` (the cached path)."""
        torch = self.torch
        from reflade.train.losses import encode_batch

        g = torch.Generator().manual_seed(res * 1000 + batch)
        chunks = []
        step = 4 if self.cuda else batch
        for i in range(0, batch, step):
            n = min(step, batch - i)
            images = torch.rand(n, 3, res, res, generator=g) * 2 - 1
            layers = torch.rand(n, 4, res, res, generator=g)
            canvases = torch.rand(n, 3, res, res, generator=g) * 2 - 1
            texts = [f"the object number {i + j}" for j in range(n)]
            chunks.append(encode_batch(bundle, images, layers, canvases, texts))
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    # ------------------------------------------------------------------ cases
    def train_cases(self) -> list[tuple[int, int, bool]]:
        """The preset's training cases, their resolutions scaled by ``--sample-res`` / the preset's default."""
        default = SAMPLE_RES[self.args.preset]
        scale = self.args.sample_res / default
        return [(int(r * scale), b, g) for r, b, g in TRAIN_CASES[self.args.preset]]

    def run(self) -> None:
        torch = self.torch
        args = self.args
        from reflade.train.config import TrainSettings
        from reflade.train.step import PhaseLoss, make_optimizer, train_step

        bundle = self.build()
        model = bundle.model
        transformer = model.transformer

        for res, batch, gc_on in self.train_cases():
            if args.batch_scale != 1.0:
                batch = max(1, int(round(batch * args.batch_scale)))
            suffix = f"{res}{'_gc' if gc_on else ''}"
            if args.only and not any(
                f"{kind}_{suffix}".startswith(o) for kind in ("train", "bare") for o in args.only
            ):
                continue
            settings = TrainSettings(
                preset=args.preset,
                phase="transformer",
                steps=10**6,
                batch_size=batch,
                lr=1e-5,
                warmup_steps=0,
                bf16=self.cuda,
                gradient_checkpointing=gc_on,
                drop_text=0.1,
                drop_canvas=0.1,
            )
            try:
                latents = self.latents(bundle, res, batch)
            except Exception as exc:  # noqa: BLE001
                self.result["errors"][f"latents_{suffix}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                self.save()
                continue
            bundle.set_gradient_checkpointing(gc_on)
            model.train()

            def reflayer_case(settings=settings, latents=latents, batch=batch):
                loss_module = PhaseLoss(bundle, settings)
                opt = make_optimizer(model.phase_parameters("transformer"), settings)
                state = {"step": 0}

                def step():
                    train_step(loss_module, opt, [latents], settings, state["step"])
                    state["step"] += 1

                sec = self.timed(step, args.warmup, args.iters)
                fused = bool(opt.defaults.get("fused"))
                return {"batch": batch, "s_per_step": sec, "samples_per_s": batch / sec, "fused_adamw": fused}

            def bare_case(settings=settings, latents=latents, batch=batch):
                from reflade.train.losses import autocast, sample_sigmas

                params = list(transformer.parameters())
                for p in params:
                    p.requires_grad_(True)
                opt = make_optimizer(params, settings)
                x0 = latents["target"]
                hidden, pooled = latents["text_hidden"], latents["text_pooled"]
                state = {"step": 0}

                def step():
                    gen = torch.Generator().manual_seed(state["step"])
                    s = sample_sigmas(bundle, x0.shape[0], gen).to(self.device)
                    noise = torch.randn(x0.shape, generator=gen).to(self.device)
                    noisy = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
                    opt.zero_grad(set_to_none=True)
                    # a preset whose transformer takes the three latents side by side (tiny) gets them
                    if transformer.config.in_channels != x0.shape[1]:
                        noisy = torch.cat([noisy, latents["image"], latents["canvas"]], 1)
                    with autocast(self.device, settings.bf16):
                        pred = transformer(
                            hidden_states=noisy,
                            encoder_hidden_states=hidden,
                            pooled_projections=pooled,
                            timestep=s * 1000.0,
                            return_dict=False,
                        )[0]
                    loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
                    loss.backward()
                    opt.step()
                    state["step"] += 1

                sec = self.timed(step, args.warmup, args.iters)
                fused = bool(opt.defaults.get("fused"))
                return {"batch": batch, "s_per_step": sec, "samples_per_s": batch / sec, "fused_adamw": fused}

            # The bare model first at each size, then RefLayer: both see the same latents and batch.
            self.case(f"bare_{suffix}", bare_case)
            self.case(f"train_{suffix}", reflayer_case)
            bare = self.result["cases"].get(f"bare_{suffix}")
            ref = self.result["cases"].get(f"train_{suffix}")
            if bare and ref:
                ref["ratio_to_bare"] = ref["samples_per_s"] / bare["samples_per_s"]
                print(f"{'':<24} RefLayer / bare at {suffix}: {ref['ratio_to_bare']:.3f}", flush=True)
                self.save()
            for p in model.parameters():
                p.grad = None
            del latents

        bundle.set_gradient_checkpointing(False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for dtype_name in self.args.infer_dtypes:
            # Cast both ways: "bf16 fp32" must measure float32 weights second, not bf16 ones again.
            bundle.to(dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float32)
            for variant in self.args.infer_variants:
                # cuDNN autotuning and the VAE / alpha decoder in channels-last, each switched per variant.
                torch.backends.cudnn.benchmark = "cudnn" in variant.split("+")
                bundle.set_channels_last("cl" in variant.split("+"))
                tag = ("" if dtype_name == "fp32" else "_bf16w") + (
                    "" if variant == "base" else f"_{variant}"
                )
                self.sampling_cases(bundle, tag)
        torch.backends.cudnn.benchmark = False
        bundle.set_channels_last(False)

    def sampling_cases(self, bundle, tag: str = "") -> None:
        """The inference cases; ``tag`` names the weights' dtype in the case names (fp32 weights: no tag)."""
        torch = self.torch
        args = self.args
        from reflade.train.losses import autocast
        from reflade.train.pipeline_reflayer import RefLayerPipeline

        res = bundle.resolution
        side = res // bundle.vae_scale_factor
        c = bundle.latent_channels
        g = torch.Generator().manual_seed(7)
        image = (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(self.device)
        lat = torch.randn(1, c, side, side, generator=g).to(self.device)
        weights_dtype = next(bundle.model.parameters()).dtype
        # Autocast for float32 weights only, as the pipeline does (bf16 weights need no casts).
        use_autocast = self.cuda and weights_dtype == torch.float32

        def vae_encode():
            with torch.inference_mode():
                with autocast(self.device, use_autocast):
                    sec = self.timed(
                        lambda: bundle.encode_pixels(image.to(weights_dtype)), args.warmup, args.iters
                    )
            return {"batch": 1, "s_per_image": sec}

        def vae_decode():
            with torch.inference_mode():
                with autocast(self.device, use_autocast):
                    sec = self.timed(lambda: bundle.decode_rgb(lat), args.warmup, args.iters)
            return {"batch": 1, "s_per_image": sec}

        self.case(f"vae_encode_{res}{tag}", vae_encode)
        self.case(f"vae_decode_{res}{tag}", vae_decode)

        hidden, pooled = bundle.text_encoder.encode(["the red mug on the left"])
        hidden, pooled = hidden.float(), pooled.float()

        def bare_sample():
            scheduler = bundle.scheduler

            def run():
                sch = type(scheduler).from_config(scheduler.config)
                sch.set_timesteps(args.sample_steps, device=self.device)
                x = lat.clone()
                wide = bundle.model.transformer.config.in_channels != c  # three latents side by side
                for t in sch.timesteps:
                    x_in = torch.cat([x, lat, lat], 1) if wide else x
                    with autocast(self.device, use_autocast):
                        v = bundle.model.transformer(
                            hidden_states=x_in.to(weights_dtype),
                            encoder_hidden_states=hidden.to(weights_dtype),
                            pooled_projections=pooled.to(weights_dtype),
                            timestep=t.expand(1),
                            return_dict=False,
                        )[0].float()
                    x = sch.step(v, t, x, return_dict=False)[0]
                return x

            with torch.inference_mode():
                sec = self.timed(run, 1, max(1, args.iters // 3))
            return {"batch": 1, "steps": args.sample_steps, "s_per_image": sec}

        self.case(f"bare_sample_{res}{tag}", bare_sample)

        pipe = RefLayerPipeline(bundle, mixed_precision=self.cuda)
        staged = RefLayerPipeline(bundle, mixed_precision=self.cuda, record_stages=True)
        prompt = {
            "box": [int(res * 0.2), int(res * 0.25), int(res * 0.7), int(res * 0.8)],
            "points": [[int(res * 0.45), int(res * 0.5), 1]],
            "text": "the red mug on the left",
        }
        image_u8 = ((image[0].permute(1, 2, 0).float().cpu().numpy() + 1.0) * 127.5).round().astype("uint8")

        for guidance in (1.0, args.guidance):

            def decompose(guidance=guidance):
                def run(p=pipe):
                    return p.decompose(
                        [image_u8],
                        [prompt],
                        ["foreground"],
                        steps=args.sample_steps,
                        guidance=guidance,
                        seeds=0,
                    )

                sec = self.timed(run, 1, max(1, args.iters // 3))
                out = run()
                ok = len(out) == 1 and out[0].shape == (res, res, 4) and out[0].dtype.name == "uint8"
                # The stages, from calls of their own (a synchronisation at each boundary): medians of 3.
                laps = []
                for _ in range(3):
                    run(staged)
                    laps.append(dict(staged.last_stages))
                stages = {k: sorted(lap[k] for lap in laps)[1] for k in laps[0]}
                return {
                    "stages_s": stages,
                    "batch": 1,
                    "steps": args.sample_steps,
                    "guidance_scale": guidance,
                    "transformer_batch": 2 if guidance > 1 else 1,
                    "s_per_image": sec,
                    "output_ok": ok,
                }

            self.case(f"decompose_{res}_cfg{guidance:g}{tag}", decompose)


def _summary(entry: dict[str, Any]) -> str:
    parts = []
    for key in ("batch", "samples_per_s", "s_per_step", "s_per_image", "peak_gib"):
        v = entry.get(key)
        if v is not None:
            parts.append(f"{key} {v:.3f}" if isinstance(v, float) else f"{key} {v}")
    if entry.get("stages_s"):
        parts.append("stages " + " ".join(f"{k} {v:.3f}" for k, v in entry["stages_s"].items()))
    return "  ".join(parts)


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda)
    for mod in ("diffusers", "transformers"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def print_table(result: dict[str, Any]) -> None:
    dev = result["device"]
    print(f"\nRefLayer GPU check: preset {result['preset']} on {dev.get('name', dev['type'])}")
    print(
        f"{'case':<36}{'batch':>6}{'samples/s':>11}{'s/step':>9}{'s/image':>9}{'peak GiB':>10}{'vs bare':>9}"
    )
    for name, e in result["cases"].items():

        def f(key, fmt, e=e):
            v = e.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        print(
            f"{name:<36}{f('batch', 'd'):>6}{f('samples_per_s', '.2f'):>11}{f('s_per_step', '.3f'):>9}"
            f"{f('s_per_image', '.3f'):>9}{f('peak_gib', '.1f'):>10}{f('ratio_to_bare', '.3f'):>9}"
        )
    staged = {n: e["stages_s"] for n, e in result["cases"].items() if e.get("stages_s")}
    if staged:
        keys = list(next(iter(staged.values())))
        print(
            f"\nstages (s, device synchronised at each boundary)\n{'case':<36}"
            + "".join(f"{k:>13}" for k in keys)
        )
        for name, st in staged.items():
            print(f"{name:<36}" + "".join(f"{st.get(k, float('nan')):>13.3f}" for k in keys))
    for name, e in result["errors"].items():
        print(f"{name:<36} FAILED {e['error'][:200]}")
    print(f"forbidden modules loaded: {result.get('forbidden_modules') or 'none'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=("auto", "sd3-medium", "tiny"),
        default="auto",
        help="sd3-medium (real size) or tiny (CPU smoke); auto: sd3-medium on CUDA, tiny on the CPU",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default 3; tiny 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case (default 10; tiny 2)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default 28; tiny 4)")
    p.add_argument("--guidance", type=float, default=3.0, help="the guided case's guidance scale (> 1)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every training batch by this")
    p.add_argument("--infer-dtypes", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="weights' dtypes of the inference cases, in order (default: fp32 bf16 on CUDA, fp32 on "
                        "the CPU); bf16 casts the bundle after the training cases")  # fmt: skip
    p.add_argument("--infer-variants", nargs="+", default=["base"],
                   help="inference settings to compare, each run for every --infer-dtypes: base, cudnn "
                        "(torch.backends.cudnn.benchmark), cl (VAE and alpha decoder channels-last), cudnn+cl; "
                        "a variant other than base suffixes the case names")  # fmt: skip
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the transformer's depth (a quick shape check of sd3-medium on a CPU)",
    )
    p.add_argument(
        "--sample-res",
        type=int,
        default=None,
        help="decomposition resolution (default 1024; tiny 128); training sizes scale with it",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", nargs="*", default=None, help="run only the cases whose names start with these")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check-<preset>.json)")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.preset == "auto":
        args.preset = "sd3-medium" if args.device.startswith("cuda") else "tiny"
    tiny = args.preset == "tiny"
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.iters = args.iters if args.iters is not None else (2 if tiny else 10)
    args.sample_steps = args.sample_steps or (4 if tiny else 28)
    args.sample_res = args.sample_res or SAMPLE_RES[args.preset]
    args.infer_dtypes = args.infer_dtypes or (
        ["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"]
    )
    bad = [v for v in args.infer_variants if not set(v.split("+")) <= {"base", "cudnn", "cl"}]
    if bad:
        p.error(f"unknown --infer-variants {bad} (known: base, cudnn, cl, cudnn+cl)")
    if args.guidance <= 1.0:
        p.error("--guidance must be > 1 (the guided case)")
    args.out = args.out or str(RESULTS / f"gpu_check-{args.preset}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    source = ensure_reflade()
    check = Check(args)
    check.result["reflade"] = source
    if check.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        check.run()
    except Exception as exc:  # noqa: BLE001 - keep what was measured
        check.result["errors"]["run"] = {
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        print(traceback.format_exc(), file=sys.stderr)
    check.result["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    check.save()
    print_table(check.result)
    print(f"wrote {check.out}")
    return 1 if check.result["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
