"""``reflade serve ...`` (run the service on the cluster, tokens) and ``reflade decompose IMAGE ...`` (call it)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from reflade.platform.cli import JsonOpt, console, get_config

app = typer.Typer(
    help="The decomposition service on Ray Serve: up, status, down, API tokens.", no_args_is_help=True
)
token_app = typer.Typer(
    help="Bearer API tokens (only their hashes are kept, in the bucket).", no_args_is_help=True
)
app.add_typer(token_app, name="token")
# A group with only a callback, so that `reflade decompose IMAGE -o ...` takes options after its argument (a
# group stops reading options at its first argument unless told otherwise).
decompose_app = typer.Typer(
    help="Decompose an image through the running service.",
    context_settings={"allow_interspersed_args": True},
)

TOKEN_FILE = "serve-token"
"""The last token `reflade serve token create` made, kept for this user (mode 0600) in the state directory, so that
`reflade decompose` works from a new shell."""


def serve_settings(cfg, overrides: dict[str, Any] | None = None):
    """The effective ``serve`` section with the command's flags on top."""
    import dataclasses

    from reflade.serve.config import ServeConfig

    base = cfg.section("serve") if "serve" in cfg.sections else ServeConfig()
    s = dataclasses.replace(base, **{k: v for k, v in (overrides or {}).items() if v is not None})
    s.validate()
    return s


def _registry(cfg):
    from reflade.platform.registry import Registry

    return Registry.from_config(cfg)


def deploy(cfg, settings, port: int | None = None) -> str:
    """Deploy (or update) the application on the cluster ``cfg`` names; returns its URL."""
    from ray import serve

    from reflade.platform.cluster import connect
    from reflade.platform.worker import storage_fields
    from reflade.serve.app import build_app
    from reflade.serve.config import APP_NAME

    host, port = cfg.stack.host, port or cfg.stack.serve_port
    connect(cfg, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, storage_fields(cfg), cfg.registry.prefix), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


@app.command("up")
def up(
    model: Annotated[str | None, typer.Option(help="Default model reference (default: serve.model).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: stack.serve_port, 8000).")] = None,
) -> None:
    """Deploy (or update) the service on the running cluster (the embedded head by default) and wait until it
    answers."""
    cfg = get_config()
    s = serve_settings(cfg, {"model": model})
    url = deploy(cfg, s, port)
    console.print(f"service up: {url} (default model {s.model}; `reflade serve status`)")


@app.command("config")
def config_file(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the Serve config (YAML).")],
    model: Annotated[str | None, typer.Option(help="Default model reference (default: serve.model).")] = None,
    host: Annotated[
        str, typer.Option(help="Interface the proxies bind to on the remote cluster.")
    ] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="HTTP port on the remote cluster.")] = 8000,
    wheel: Annotated[
        str | None,
        typer.Option(
            help="URI of this project's wheel for the cluster's runtime_env (py_modules), e.g. s3://...whl."
        ),
    ] = None,
) -> None:
    """Write a Serve config file for `serve deploy` on a remote cluster (or a KubeRay RayService's serveConfigV2):
    the application, its settings and where the bucket is. No credential goes in it: the cluster's pods take them
    from their own environment."""
    import dataclasses

    import yaml

    from reflade.platform.worker import storage_fields
    from reflade.serve.config import APP_NAME

    cfg = get_config()
    s = serve_settings(cfg, {"model": model})
    application: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "reflade.serve.app:app_from_args",
        "args": {
            "settings": dataclasses.asdict(s),
            "storage": storage_fields(cfg),
            "registry_prefix": cfg.registry.prefix,
        },
    }
    if wheel:
        application["runtime_env"] = {"py_modules": [wheel]}
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [application],
    }
    output.write_text(yaml.safe_dump(doc, sort_keys=False))
    console.print(
        f"wrote {output}: `serve deploy {output}` on the cluster (or paste it as a RayService's serveConfigV2)"
    )


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """The application's and its deployments' state and replica counts."""
    from ray import serve

    from reflade.platform.cluster import connect
    from reflade.serve.config import APP_NAME

    cfg = get_config()
    connect(cfg, log_to_driver=False)
    apps = serve.status().applications
    if APP_NAME not in apps:
        if as_json:
            print(json.dumps({"status": "NOT_RUNNING"}))
        else:
            console.print("the service is not running (`reflade serve up`)")
        return
    a = apps[APP_NAME]
    out = {
        "status": str(a.status.value if hasattr(a.status, "value") else a.status),
        "deployments": {
            name: {
                "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                "replicas": {
                    str(k.value if hasattr(k, "value") else k): v for k, v in d.replica_states.items()
                },
            }
            for name, d in a.deployments.items()
        },
    }
    if as_json:
        print(json.dumps(out, indent=1))
        return
    console.print(f"{APP_NAME}: {out['status']}")
    for name, d in out["deployments"].items():
        console.print(f"  {name}: {d['status']}, replicas {d['replicas']}")


@app.command("down")
def down() -> None:
    """Remove the service from the cluster (the cluster keeps running)."""
    from ray import serve

    from reflade.platform.cluster import connect
    from reflade.serve.config import APP_NAME

    connect(get_config(), log_to_driver=False)
    serve.delete(APP_NAME)
    console.print("service removed")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="A label for the token (who or what uses it).")] = "default",
) -> None:
    """Make a new API token: printed ONCE; its hash goes to the bucket (the service reads it within seconds), and
    the token to this user's state directory (0600) for `reflade decompose`."""
    cfg = get_config()
    token, path = create_token(cfg, name)
    console.print(f"token {name!r} (shown once; also saved for this user in {path}):")
    print(token)


def create_token(cfg, name: str) -> tuple[str, Path]:
    """A new API token: its hash added to the bucket's list (compare-and-swap), the token saved for this user
    (mode 0600) in the state directory. Returns the token and where it was saved."""
    from reflade.serve.auth import new_token

    token, digest = new_token()
    _update_tokens(cfg, lambda tokens: tokens + [{"name": name, "hash": digest, "created": _now()}])
    path = cfg.stack.resolved_state_dir() / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


@token_app.command("ls")
def token_ls(as_json: JsonOpt = False) -> None:
    """The tokens' names and creation times (never the tokens; not even their hashes)."""
    from reflade.serve.app import TOKEN_HASHES_KEY

    reg = _registry(get_config())
    doc = _read_tokens(reg, TOKEN_HASHES_KEY)[0]
    rows = [{"name": t["name"], "created": t["created"]} for t in doc.get("tokens", [])]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        console.print(f"{r['name']:<24} {r['created']}")


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="The token's label.")]) -> None:
    """Remove every token with this label (the service stops accepting it within seconds)."""
    cfg = get_config()
    removed = _update_tokens(cfg, lambda tokens: [t for t in tokens if t["name"] != name])
    console.print(f"revoked {removed} token(s) named {name!r}")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_tokens(reg, key: str) -> tuple[dict[str, Any], str | None]:
    from reflade.platform.storage import ObjectNotFound

    try:
        return reg.storage.get_json(f"{reg.prefix.rstrip('/')}/{key}")
    except ObjectNotFound:
        return {"tokens": []}, None


def _update_tokens(cfg, change) -> int:
    """Apply ``change`` to the token list with a compare-and-swap write; returns how many tokens went away."""
    from reflade.platform.storage import PreconditionFailed
    from reflade.serve.app import TOKEN_HASHES_KEY

    reg = _registry(cfg)
    key = f"{reg.prefix.rstrip('/')}/{TOKEN_HASHES_KEY}"
    for _ in range(20):
        doc, etag = _read_tokens(reg, TOKEN_HASHES_KEY)
        before = list(doc.get("tokens", []))
        after = change(before)
        try:
            if etag is None:
                reg.storage.put_json(key, {"tokens": after}, if_none_match=True)
            else:
                reg.storage.put_json(key, {"tokens": after}, if_match=etag)
            return max(0, len(before) - len(after))
        except PreconditionFailed:
            continue
    raise typer.Exit(1)


def saved_token(cfg) -> str | None:
    """The token `reflade serve token create` saved for this user, if any."""
    path = cfg.stack.resolved_state_dir() / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _floats(text: str, n: int, what: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != n:
        raise typer.BadParameter(f"{what} takes {n} comma-separated numbers, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"{what} takes numbers, got {text!r}") from None


@decompose_app.callback(invoke_without_command=True)
def decompose(
    image: Annotated[
        Path, typer.Argument(help="The image file (PNG, JPEG, ...).", exists=True, dir_okay=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the RGBA layer (PNG).")],
    box: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 in the image's pixels.")] = None,
    point: Annotated[
        list[str] | None, typer.Option(help="x,y[,label] (label 1 positive, 0 negative); repeatable.")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Text naming the thing.")] = None,
    kind: Annotated[
        str, typer.Option(help="foreground (the thing's layer) or background (the scene without it).")
    ] = "foreground",
    model: Annotated[
        str | None, typer.Option(help="Model reference or classical (default: the service's).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (default: the service's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the decomposition.")] = 0,
    url: Annotated[
        str | None, typer.Option(help="Service URL (default: http://stack.host:stack.serve_port).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="API token (default: the one `reflade serve token create` saved).",
            envvar="REFLADE_API_TOKEN",
        ),
    ] = None,
) -> None:
    """Decompose IMAGE through the running service and write the layer to --output."""
    from reflade.engine.schema import encode_png
    from reflade.serve.client import Client

    prompt: dict[str, Any] = {}
    if box:
        prompt["box"] = _floats(box, 4, "--box")
    if point:
        pts = []
        for p in point:
            parts = p.split(",")
            vals = _floats(p if len(parts) == 3 else p + ",1", 3, "--point")
            pts.append(vals)
        prompt["points"] = pts
    if text:
        prompt["text"] = text
    if not prompt:
        raise typer.BadParameter("give a prompt: --box, --point or --text (or a mix)")
    cfg = get_config()
    client = Client(url or f"http://{cfg.stack.host}:{cfg.stack.serve_port}", token or saved_token(cfg))
    doc = client.decompose_json(image, prompt, kind, model=model, steps=steps, seed=seed)
    output.write_bytes(encode_png(doc["layer"]))
    console.print(
        f"{output}: {doc['layer'].shape[1]}x{doc['layer'].shape[0]} RGBA from {doc['model']} ({kind}, seed {doc['seed']})"
    )
