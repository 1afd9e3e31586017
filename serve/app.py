"""The Serve application: a FastAPI ingress in front of an autoscaling decomposer deployment.

- :func:`build_app` makes the application from the ``serve`` section: the ingress (HTTP API under ``/v1``, health,
  metrics, auth) and the decomposer (models loaded once per replica from the registry, several versions side by side
  through ``@serve.multiplexed``, requests batched through ``@serve.batch``).
- Requests name a model by registry reference (an alias is resolved by the ingress, re-read at most every
  ``alias_refresh_s``, and routed by its exact version), or ``classical`` (the weight-free decomposer).
- Bad input is a 4xx JSON error (:class:`reflade.serve.requests.ApiError`); full queues are 503 with Retry-After.

Deployment arguments carry only non-secret locations (the bucket's endpoint, name and region, the registry prefix):
each replica takes credentials from its own environment, and API tokens never travel (only their hashes, read from
the bucket by the ingress).
"""

import asyncio
import base64
import json
import secrets
import time
from dataclasses import asdict
from typing import Any

# Real annotation objects (no `from __future__ import annotations` in this module): the ingress class is built in a
# function and pickled by value onto its replica, where string annotations could no longer be resolved by FastAPI.
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from reflade.serve.config import ServeConfig
from reflade.serve.metrics import Metrics
from reflade.serve.openapi import PAIR_DOC, VOTE_DOC, route_doc

__all__ = ["TOKEN_HASHES_KEY", "app_from_args", "build_app"]

TOKEN_HASHES_KEY = "serve/token-hashes.json"
"""Where ``reflade serve token create`` keeps the token hashes, under the registry prefix in the bucket."""


def build_app(settings: ServeConfig, storage_fields: dict[str, Any], registry_prefix: str):
    """The Serve application (``serve.run(build_app(...), name=APP_NAME)``)."""

    s = settings
    decomposer_cls = _decomposer_class(s)
    ingress_cls = _ingress_class(s)
    device = "cuda" if s.num_gpus > 0 else "cpu"
    from reflade.serve.batching import replica_dtype

    decomposer = decomposer_cls.options(
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
        },
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(storage_fields, registry_prefix, device, replica_dtype(s.bf16, device))
    # The ingress only parses and waits on the decomposer, so it takes many requests at once: the back-pressure that
    # answers 503 is the decomposer's bounded queue, not an unbounded queue in front of the ingress (Serve's default
    # of 5 ongoing requests per replica would let the proxy queue the excess without limit).
    return ingress_cls.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=s.ingress_max_ongoing_requests,
    ).bind(decomposer, asdict(s), storage_fields, registry_prefix)


def app_from_args(args: dict[str, Any]):
    """Application builder for a Serve config file (``import_path: reflade.serve.app:app_from_args``; what
    ``reflade serve config`` writes for ``serve deploy`` on a remote cluster): ``args`` holds ``settings`` (the
    ``serve`` section's fields), ``storage`` (endpoint, bucket, region: no credentials) and ``registry_prefix``.

    Raises:
        ValueError: a missing key or a storage field that is not a location (a credential must not travel this way).
    """
    missing = [k for k in ("settings", "storage", "registry_prefix") if k not in args]
    if missing:
        raise ValueError(f"reflade.serve.app:app_from_args needs args {missing}")
    extra = sorted(set(args["storage"]) - {"endpoint", "bucket", "region"})
    if extra:
        raise ValueError(f"args.storage may hold only endpoint, bucket and region, not {extra}")
    settings = ServeConfig(**args["settings"])
    settings.validate()
    return build_app(settings, dict(args["storage"]), str(args["registry_prefix"]))


# ---------------------------------------------------------------------------------------------- decomposer
def _decomposer_class(s: ServeConfig):
    from ray import serve

    @serve.deployment(name="decomposer")
    class Decomposer:
        """Holds models (by exact registry version) and ``classical``; decomposes batches of requests."""

        def __init__(
            self, storage_fields: dict[str, Any], registry_prefix: str, device: str, dtype: str | None = None
        ):
            from reflade.engine.classical_decomposer import ClassicalDecomposer
            from reflade.platform.worker import worker_registry

            self.registry = worker_registry(storage_fields, registry_prefix)
            self.device = device
            self.dtype = dtype  # "bfloat16" on a GPU with serve.bf16 (reflade.serve.batching.replica_dtype)
            self.classical = ClassicalDecomposer()

        @serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)
        async def model(self, model_id: str):
            if model_id == "classical":
                return self.classical
            import torch

            from reflade.train.pipeline_reflayer import RefLayerPipeline

            dtype = getattr(torch, self.dtype) if self.dtype else None
            return await asyncio.to_thread(
                RefLayerPipeline.from_registry, model_id, self.registry, device=self.device, dtype=dtype
            )

        async def decompose(self, item: dict[str, Any]) -> dict[str, Any]:
            """One item: ``image`` HxWx3 uint8, ``prompt``, ``kind``, ``steps``, ``guidance``, ``seed``,
            ``model`` (exact reference or ``classical``) -> ``layer`` HxWx4 uint8, ``batch_size``, ``seconds``."""
            return await self.batched(item)

        @serve.batch(max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s)
        async def batched(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            from reflade.serve.batching import decompose_group, group_items

            out: list[dict[str, Any] | None] = [None] * len(items)
            for (model_id, _, _), idx in group_items(items).items():
                model = await self.model(model_id)
                results = await asyncio.to_thread(decompose_group, model, [items[i] for i in idx])
                for i, result in zip(idx, results, strict=True):
                    out[i] = result
            return out

    return Decomposer


# ---------------------------------------------------------------------------------------------- ingress
def _ingress_class(s: ServeConfig):
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from ray import serve

    from reflade.serve.requests import ApiError

    api = FastAPI(
        title="RefLade decomposition API",
        version="1",
        description="Referring layer decomposition: an image and a prompt in, the complete RGBA layer out.",
    )
    if s.cors_origins:
        api.add_middleware(
            CORSMiddleware, allow_origins=list(s.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = dict(exc.headers or {})
        if exc.status == 503:
            headers.setdefault("Retry-After", "1")
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers or None)

    @serve.deployment(name="ingress")
    @serve.ingress(api)
    class Ingress:
        def __init__(self, decomposer, settings: dict[str, Any], storage_fields: dict[str, Any], prefix: str):
            from reflade.platform.worker import worker_registry
            from reflade.serve.requests import Limits

            self.decomposer = decomposer
            self.s = ServeConfig(**settings)
            self.registry = worker_registry(storage_fields, prefix)
            self.limits = Limits(
                max_bytes=int(self.s.max_upload_mb * 1024 * 1024),
                max_pixels=self.s.max_pixels,
                max_prompts=self.s.max_prompts,
                max_text=self.s.max_text,
                max_steps=self.s.max_steps,
            )
            self.resolved: dict[str, tuple[str, float]] = {}
            self.tokens: tuple[Any, float] | None = None
            self.metrics = Metrics()
            from reflade.serve.votes import VoteBook

            self.votes = VoteBook(self.registry)

        # ------------------------------------------------------------------ helpers
        async def _auth(self, request: Request) -> None:
            if not self.s.require_token:
                return
            from reflade.serve.auth import TokenChecker

            now = time.monotonic()
            if self.tokens is None or now > self.tokens[1]:
                hashes = await asyncio.to_thread(read_token_hashes, self.registry)
                self.tokens = (TokenChecker(hashes), now + 10.0)
            checker = self.tokens[0]
            if not checker.enabled:
                raise ApiError(
                    401,
                    "no_tokens",
                    "no API token is configured: create one with `reflade serve token create`",
                )
            checker.check(request.headers.get("authorization"))

        async def _resolve(self, ref: str | None) -> str:
            """An exact model version (or ``classical``) for a requested reference; aliases cached briefly."""
            ref = ref or self.s.model
            if ref == "classical":
                return ref
            now = time.monotonic()
            hit = self.resolved.get(ref)
            if hit and now < hit[1]:
                return hit[0]
            from reflade.platform.registry import Ref, RegistryError

            try:
                Ref.parse(ref)  # a malformed reference is the client's mistake (422), an absent one a 404
            except RegistryError as e:
                raise ApiError(422, "bad_model_reference", str(e)) from None
            try:
                v = await asyncio.to_thread(self.registry.resolve, ref)
            except RegistryError as e:
                raise ApiError(404, "unknown_model", str(e)) from None
            except ValueError as e:
                raise ApiError(422, "bad_model_reference", str(e)) from None
            if v.kind != "model":
                raise ApiError(422, "bad_model_reference", f"{v.ref} is a {v.kind}, not a model")
            self.resolved[ref] = (v.ref, now + self.s.alias_refresh_s)
            return v.ref

        async def _parse(self, request: Request):
            from reflade.serve.requests import parse_form_request, parse_json_request

            ctype = request.headers.get("content-type", "")
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_bytes * 4 // 3 + 65536:
                raise ApiError(
                    413, "too_large", f"request body of {int(declared)} bytes exceeds the upload limit"
                )
            if ctype.startswith("application/json"):
                raw = await request.body()
                try:
                    body = json.loads(raw)
                # UnicodeDecodeError is a ValueError; RecursionError is JSON nested too deeply.
                except (ValueError, RecursionError):
                    raise ApiError(
                        400, "invalid_json", "the body is not valid JSON (or nested too deeply)"
                    ) from None
                return parse_json_request(body, self.limits)
            if ctype.startswith("multipart/form-data"):
                from starlette.exceptions import HTTPException

                try:
                    form = await request.form(max_files=2, max_fields=32)
                except HTTPException as e:  # malformed multipart: the service's JSON error, not Starlette's
                    raise ApiError(
                        400, "invalid_multipart", f"the multipart body is malformed: {e.detail}"
                    ) from None
                files, fields = {}, {}
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        files[key] = await value.read(self.limits.max_bytes + 1)
                    else:
                        fields[key] = str(value)
                return parse_form_request(fields, files.get("image"), files.get("mask"), self.limits)
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {ctype or '(none)'}: send application/json or multipart/form-data",
            )

        async def _run(self, req, prompt: dict[str, Any], model: str) -> dict[str, Any]:
            from ray.serve.exceptions import BackPressureError

            from reflade.serve.batching import request_item

            item = request_item(req, prompt, model=model, default_steps=self.s.steps)
            from ray.exceptions import RayActorError
            from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

            handle = self.decomposer.options(multiplexed_model_id=model)
            for attempt in range(self.s.replica_retries + 1):
                try:
                    result = await handle.decompose.remote(item)
                    break
                except BackPressureError:
                    raise ApiError(503, "busy", "the decomposer's queue is full; retry shortly") from None
                # A replica lost mid-request (its process died): the same request again (a decomposition is a
                # pure function of the item and its seed) on another or a restarted replica, then a 503.
                except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as e:
                    if attempt == self.s.replica_retries:
                        raise ApiError(
                            503,
                            "replica_lost",
                            f"the decomposer replica was lost ({type(e).__name__}); retry",
                        ) from None
                    await asyncio.sleep(0.5 * (attempt + 1))
            if "error" in result:
                raise ApiError(422, "refused", result["error"])
            return result

        # ------------------------------------------------------------------ endpoints
        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/readyz")
        async def readyz(self):
            try:
                exact = await self._resolve(self.s.model)
            except ApiError as e:
                return JSONResponse(
                    {
                        "ready": False,
                        "reason": f"default model {self.s.model}: {e.message}",
                        "classical": True,
                    },
                    status_code=503,
                )
            return {"ready": True, "model": exact}

        @api.get("/metrics")
        async def metrics(self):
            return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

        @api.get("/v1/models")
        async def models(self, request: Request) -> dict[str, Any]:
            await self._auth(request)
            default: dict[str, Any] = {"reference": self.s.model}
            try:
                default["version"] = await self._resolve(self.s.model)
            except ApiError as e:
                default["error"] = e.message
            return {
                "default": default,
                "classical": True,
                "resolved": {k: v[0] for k, v in self.resolved.items()},
            }

        @api.post(
            "/v1/decompose",
            openapi_extra=route_doc(
                {
                    "description": "the layer",
                    "content": {"image/png": {}, "application/json": {"schema": {"type": "object"}}},
                }
            ),
        )
        async def decompose(self, request: Request):
            """An image and one prompt -> the RGBA layer (PNG), or JSON with it as base64 (``response: json``)."""
            t0 = time.perf_counter()
            model = "?"
            try:
                await self._auth(request)
                req = await self._parse(request)
                if req.seed is None:
                    req.seed = secrets.randbelow(2**31)  # reported back, so the layer can be made again
                model = await self._resolve(req.model)
                if len(req.prompts) != 1:
                    raise ApiError(
                        422, "one_prompt", "POST /v1/decompose takes one prompt; use /v1/decompose/layers"
                    )
                result = await self._run(req, req.prompts[0], model)
            except ApiError as e:
                self.metrics.observe("decompose", model, e.status, time.perf_counter() - t0)
                raise
            from reflade.engine.schema import encode_png

            png = encode_png(result["layer"])
            secs = time.perf_counter() - t0
            self.metrics.observe("decompose", model, 200, secs, result["batch_size"])
            meta = {"model": model, "seed": req.seed, "kind": req.kind, "steps": req.steps or self.s.steps}
            if req.response == "json":
                return {
                    "layer_png": base64.b64encode(png).decode(),
                    **meta,
                    "timings": {
                        "total_s": secs,
                        "model_s": result["seconds"],
                        "batch_size": result["batch_size"],
                    },
                }
            headers = {"X-RefLade-Model": model, "X-RefLade-Seed": str(req.seed)}
            return Response(png, media_type="image/png", headers=headers)

        @api.post(
            "/v1/decompose/layers",
            openapi_extra=route_doc(
                {"description": "the layer stack", "content": {"application/zip": {}, "image/openraster": {}}}
            ),
        )
        async def layers(self, request: Request, format: str = "zip"):
            """An image and several prompts (batched) -> a layer stack: ZIP of PNGs, or OpenRaster (``format=ora``)."""
            from reflade.serve.layerfiles import openraster, zip_layers

            if format not in ("zip", "ora"):
                raise ApiError(422, "bad_format", f"format {format!r}: zip or ora")
            t0 = time.perf_counter()
            await self._auth(request)
            req = await self._parse(request)
            if req.seed is None:
                req.seed = secrets.randbelow(2**31)
            model = await self._resolve(req.model)
            results = await asyncio.gather(*(self._run(req, p, model) for p in req.prompts))
            named = [(f"layer-{i:02d}-{req.kind}", r["layer"]) for i, r in enumerate(results)]
            self.metrics.observe("layers", model, 200, time.perf_counter() - t0)
            headers = {"X-RefLade-Model": model}
            if format == "ora":
                return Response(openraster(req.image, named), media_type="image/openraster", headers=headers)
            return Response(zip_layers(named), media_type="application/zip", headers=headers)

        # ------------------------------------------------------------------ pages, votes (pages.py, votes.py)
        @api.get("/", include_in_schema=False)
        async def decompose_page(self):
            from reflade.serve.pages import static_response

            return static_response("index.html")

        @api.get("/vote", include_in_schema=False)
        async def vote_page(self):
            from reflade.serve.pages import static_response

            return static_response("vote.html")

        @api.get("/static/{name}", include_in_schema=False)
        async def static(self, name: str):
            from reflade.serve.pages import static_response

            return static_response(name)

        @api.get("/v1/vote/pair", openapi_extra=PAIR_DOC)
        async def vote_pair(self, request: Request):
            """A dataset item decomposed by two models (A on the left, at random), for a person to judge."""
            from reflade.serve.votes import make_pair

            await self._auth(request)
            return await make_pair(
                request.query_params, self.registry, self._resolve, self._run, self.s.steps
            )

        @api.post("/v1/votes", openapi_extra=VOTE_DOC)
        async def vote(self, request: Request):
            """Record a vote as a new version of ``votes/NAME`` (every vote of that name so far)."""
            from reflade.serve.votes import parse_vote, read_vote_body

            await self._auth(request)
            name, vote = parse_vote(await read_vote_body(request))
            return JSONResponse(await self.votes.record(name, vote), status_code=201)

    return Ingress


def read_token_hashes(registry) -> list[str]:
    """The token hashes kept in the bucket (empty when none was created)."""
    from reflade.platform.storage import ObjectNotFound

    try:
        doc, _ = registry.storage.get_json(f"{registry.prefix.rstrip('/')}/{TOKEN_HASHES_KEY}")
    except ObjectNotFound:
        return []
    return [h["hash"] for h in doc.get("tokens", [])]
