"""The ``reflade`` command line. Thin: it parses options into the configuration and calls library functions.

Other packages add top-level commands through the entry-point group ``reflade.commands`` (name = command,
value = a Typer app); this module imports none of them directly.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reflade.platform.config import Config, ConfigError, load_config

# Piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

app = typer.Typer(
    name="reflade",
    help="RefLade: Referring Layer Decomposition on Ray. Data engine, RefLayer training, serving and HPA eval, "
    "all on one cluster and one artifact registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(
    help="The artifact registry: datasets, models, weights, eval reports.", no_args_is_help=True
)
jobs_app = typer.Typer(
    help="Ray jobs: run a job kind on the cluster, follow it, stop it.", no_args_is_help=True
)
config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


class _State:
    config_path: str | None = None
    _config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


STATE = _State()


def get_config() -> Config:
    """The configuration of this invocation (``--config``, ``REFLADE_CONFIG``, ``REFLADE_*`` variables)."""
    return STATE.config()


@app.callback()
def _root(
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="YAML configuration file (default: $REFLADE_CONFIG).", metavar="FILE"
        ),
    ] = None,
) -> None:
    STATE.config_path = config
    STATE._config = None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------- stack
@app.command()
def up(
    state_dir: Annotated[str | None, typer.Option(help="State directory (default ~/.reflade).")] = None,
    s3_port: Annotated[
        int | None, typer.Option(help="SeaweedFS S3 port (also uses +1..+5 and +10000..).")
    ] = None,
    ray_port: Annotated[int | None, typer.Option(help="Ray GCS port.")] = None,
    dashboard_port: Annotated[int | None, typer.Option(help="Ray dashboard / job API port.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the Ray head offers.")] = None,
) -> None:
    """Start the embedded stack: SeaweedFS (S3, generated credentials) and a Ray head with token auth."""
    from reflade.platform.stack import EmbeddedStack

    cfg = _stack_overrides(state_dir, s3_port, ray_port, dashboard_port, num_cpus)
    state = EmbeddedStack(cfg.stack, cfg.storage).up(log=console.print)
    console.print(
        f"[bold]up[/]: S3 {state['seaweedfs']['endpoint']} (bucket {state['bucket']}), "
        f"Ray {state['ray']['address']}, dashboard {state['ray']['dashboard_url']}; "
        f"state and credentials in {state['state_dir']} (mode 0600)"
    )


def _stack_overrides(state_dir, s3_port, ray_port, dashboard_port, num_cpus) -> Config:
    cfg = get_config()
    for key, value in (
        ("state_dir", state_dir),
        ("s3_port", s3_port),
        ("ray_port", ray_port),
        ("dashboard_port", dashboard_port),
        ("ray_num_cpus", num_cpus),
    ):
        if value is not None:
            setattr(cfg.stack, key, value)
    cfg.follow_stack()  # the endpoint follows --s3-port unless it was set explicitly
    return cfg


@app.command()
def down(
    state_dir: Annotated[str | None, typer.Option(help="State directory (default ~/.reflade).")] = None,
) -> None:
    """Stop the embedded stack (Ray head, then SeaweedFS). Data and credentials stay for the next `up`."""
    from reflade.platform.stack import EmbeddedStack

    cfg = _stack_overrides(state_dir, None, None, None, None)
    EmbeddedStack(cfg.stack, cfg.storage).down(log=console.print)


@app.command()
def status(
    state_dir: Annotated[str | None, typer.Option(help="State directory (default ~/.reflade).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What runs where: the object store and the Ray head of the embedded stack, probed now."""
    from reflade.platform.stack import EmbeddedStack

    cfg = _stack_overrides(state_dir, None, None, None, None)
    st = EmbeddedStack(cfg.stack, cfg.storage).status()
    if as_json:
        _print_json(st)
        return
    if not st["running"]:
        console.print(
            f"embedded stack: not running (state dir {st['state_dir']}); start it with `reflade up`"
        )
        raise typer.Exit(1)
    table = Table("component", "where", "process", "answering", "log")
    o, r = st["object_store"], st["ray"]
    table.add_row(
        "object store (SeaweedFS)",
        f"{o['endpoint']} bucket {st['bucket']}",
        f"{o['process']} (pid {o['pid']})",
        o["s3"],
        o["log"],
    )
    table.add_row(
        "Ray head",
        f"{r['address']}  dashboard {r['dashboard_url']}  auth {r['auth']}",
        f"{r['process']} (pid {r['pid']})",
        r["dashboard"],
        r["log"],
    )
    console.print(table)
    if not st["healthy"]:
        raise typer.Exit(1)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Leave the stack running at the end.")] = False,
    state_dir: Annotated[str | None, typer.Option(help="State directory of the demo's stack.")] = None,
    output: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path("demo-output"),
) -> None:
    """The main job on the embedded defaults: stack up, every pipeline step, stack down (unless --keep)."""
    from reflade.platform.demo import run_demo

    cfg = _stack_overrides(state_dir, None, None, None, None)
    run_demo(cfg, keep=keep, output=output, console=console)


# ---------------------------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(as_json: JsonOpt = False) -> None:
    """Print the effective configuration (defaults < YAML < environment), secrets masked."""
    import yaml

    from reflade.platform.storage import StorageError, resolve_credentials

    cfg = get_config()
    data = cfg.to_dict(mask_secrets=True)
    try:
        creds_from = resolve_credentials(cfg.storage, cfg.stack.resolved_state_dir()).source
    except StorageError as e:
        creds_from = f"none ({e})"
    if as_json:
        _print_json({"source_file": cfg.source_file, "config": data, "storage_credentials_from": creds_from})
        return
    if cfg.source_file:
        print(f"# from {cfg.source_file} and the environment")
    print(f"# storage credentials from: {creds_from}")
    print(yaml.safe_dump(data, sort_keys=False).rstrip())


# ---------------------------------------------------------------------------------------------- registry
def _registry():
    from reflade.platform.registry import Registry

    return Registry.from_config(get_config())


@registry_app.command("ls")
def registry_ls(
    kind: Annotated[
        str | None, typer.Argument(help="Only this kind (dataset, model, weights, eval-report, ...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered artifacts: one row per KIND/NAME with its latest version and aliases."""
    rows = _registry().list(kind)
    if as_json:
        _print_json(rows)
        return
    table = Table("ref", "latest", "versions", "aliases", "size", "created")
    for r in rows:
        aliases = ", ".join(f"{a}@{v}" for a, v in r["aliases"].items())
        table.add_row(
            r["ref"], str(r["latest"]), str(r["versions"]), aliases, _human_size(r["size"]), r["created"]
        )
    console.print(table if rows else "registry is empty")


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="KIND/NAME[@VERSION|@ALIAS]")], as_json: JsonOpt = False
) -> None:
    """Show one version: manifest, files, aliases pointing at it."""
    reg = _registry()
    v = reg.resolve(ref)
    aliases = {a: n for a, n in reg.aliases(v.kind, v.name).items()}
    pointing = sorted(a for a, n in aliases.items() if n == v.version)
    if as_json:
        _print_json(
            {**v.manifest, "ref": v.ref, "aliases": pointing, "uris": [v.uri(f["path"]) for f in v.files]}
        )
        return
    m = v.manifest
    console.print(f"[bold]{v.ref}[/]  aliases: {', '.join(pointing) or '-'}")
    for key in ("created", "creator", "license", "source", "content_sha256"):
        if m.get(key):
            console.print(f"  {key}: {m[key]}")
    console.print(f"  prefix: s3://{v.bucket}/{v.prefix}")
    if v.parents:
        console.print(f"  parents: {', '.join(v.parents)}")
    for label in ("metadata", "metrics"):
        if m.get(label):
            console.print(f"  {label}: {json.dumps(m[label], sort_keys=True)}")
    table = Table("file", "size", "sha256")
    for f in v.files[:200]:
        table.add_row(f["path"], _human_size(f["size"]), f["sha256"][:16] + "...")
    console.print(table)
    if len(v.files) > 200:
        console.print(f"... and {len(v.files) - 200} more files (use --json)")


def _parse_kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@registry_app.command("import")
def registry_import(
    kind: Annotated[str, typer.Argument(help="dataset, model, weights, eval-report (or another kind).")],
    name: Annotated[str, typer.Argument(help="Name: [a-z0-9][a-z0-9._-]{0,63}.")],
    path: Annotated[Path, typer.Argument(help="A file or a folder (e.g. a diffusers checkpoint folder).")],
    license: Annotated[
        str | None, typer.Option("--license", help="Licence of the content (recorded).")
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="Where it came from, e.g. a URL (recorded).")
    ] = None,
    parent: Annotated[
        list[str] | None, typer.Option("--parent", help="Lineage: a reference it was built from.")
    ] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="Metadata KEY=VALUE (repeatable).")] = None,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="Also point this alias at the version.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a new immutable version of KIND/NAME from a file or folder (identical content is reused)."""
    reg = _registry()
    v = reg.create(
        kind, name, path, license=license, source=source, parents=parent or [], metadata=_parse_kv(meta)
    )
    for a in alias or []:
        reg.set_alias(v.ref, a)
    if v.skipped_links:
        shown = ", ".join(v.skipped_links[:10]) + (" ..." if len(v.skipped_links) > 10 else "")
        err_console.print(
            f"[yellow]skipped {len(v.skipped_links)} symbolic link(s)[/] (links are never followed; copy the "
            f"files in to import them): {escape(shown)}",
            highlight=False,
        )
    if as_json:
        _print_json(
            {
                "ref": v.ref,
                "version": v.version,
                "reused": v.reused,
                "files": len(v.files),
                "size": v.size(),
                "skipped_links": v.skipped_links,
            }
        )
        return
    if v.reused:
        console.print(f"identical content is already registered as {v.ref}; no new version created")
    else:
        console.print(f"registered {v.ref} ({len(v.files)} files, {_human_size(v.size())})")


@registry_app.command("download")
def registry_download(
    ref: Annotated[str, typer.Argument(help="KIND/NAME[@VERSION|@ALIAS]")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the version's files into.")],
) -> None:
    """Download a version's files into DEST, verifying each sha256."""
    reg = _registry()
    v = reg.resolve(ref)
    reg.download(v.ref, dest)
    console.print(
        f"downloaded {v.ref} ({len(v.files)} files, {_human_size(v.size())}) to {dest}; sha256 verified"
    )


@registry_app.command("alias")
def registry_alias(
    ref: Annotated[str, typer.Argument(help="KIND/NAME@VERSION (or another alias) to point at.")],
    alias: Annotated[str, typer.Argument(help="Alias to move, e.g. candidate, production.")],
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect",
            help="Move only if ALIAS points at this version now ('none': only if it does not exist yet); "
            "fails, changing nothing, if it moved meanwhile.",
        ),
    ] = None,
) -> None:
    """Move ALIAS to the version REF names (compare-and-swap; the history is kept)."""
    from reflade.platform.registry import ANY_VERSION

    expected: object = ANY_VERSION
    if expect is not None:
        if expect.lower() == "none":
            expected = None
        elif expect.isdigit():
            expected = int(expect)
        else:
            raise typer.BadParameter("--expect takes a version number or 'none'", param_hint="--expect")
    move = _registry().set_alias(ref, alias, expected=expected)
    before = f"@{move.from_version}" if move.from_version is not None else "(new)"
    console.print(f"alias {alias}: {before} -> @{move.to_version}")


@registry_app.command("history")
def registry_history(
    ref: Annotated[str, typer.Argument(help="KIND/NAME")],
    alias: Annotated[str, typer.Argument(help="Alias")],
    as_json: JsonOpt = False,
) -> None:
    """Who moved ALIAS of KIND/NAME, from which version to which, and when."""
    from reflade.platform.registry import Ref

    r = Ref.parse(ref)
    hist = _registry().alias_history(r.kind, r.name, alias)
    if as_json:
        _print_json(hist)
        return
    table = Table("at", "by", "from", "to")
    for h in hist:
        table.add_row(h["at"], h["by"], str(h["from"] if h["from"] is not None else "-"), str(h["to"]))
    console.print(table)


@registry_app.command("lineage")
def registry_lineage(
    ref: Annotated[str, typer.Argument(help="KIND/NAME[@VERSION|@ALIAS]")],
    depth: Annotated[int, typer.Option(help="How many generations each way.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """What a version was built from, and what was built from it."""
    tree = _registry().lineage(ref, depth)
    if as_json:
        _print_json(tree)
        return
    from rich.tree import Tree

    root = Tree(f"[bold]{tree['ref']}[/]")
    up_ = root.add("built from")
    down_ = root.add("used by")

    def add(node, items, key):
        for item in items:
            add(node.add(item["ref"]), item[key], key)

    add(up_, tree["parents"], "parents")
    add(down_, tree["children"], "children")
    console.print(root)


@registry_app.command("gc")
def registry_gc(
    delete: Annotated[bool, typer.Option("--delete", help="Really delete (default: dry run).")] = False,
    grace_s: Annotated[float | None, typer.Option(help="Keep orphans younger than this (s).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find files that no version references (left by interrupted imports); dry run unless --delete."""
    cfg = get_config()
    grace = cfg.registry.gc_grace_s if grace_s is None else grace_s
    report = _registry().gc(dry_run=not delete, grace_s=grace)
    if as_json:
        _print_json(
            {
                "orphans": report.orphans,
                "bytes": report.bytes,
                "deleted": report.deleted,
                "kept_young": report.kept_young,
            }
        )
        return
    verb = "deleted" if report.deleted else "would delete (dry run; --delete to remove)"
    console.print(
        f"{len(report.orphans)} orphaned files, {_human_size(report.bytes)}: {verb}; "
        f"{report.kept_young} younger than {grace:.0f} s kept"
    )
    for o in report.orphans[:50]:
        console.print(f"  {o['key']}")


# ---------------------------------------------------------------------------------------------- jobs
def _jobs():
    from reflade.platform.jobs import Jobs

    return Jobs(get_config())


@jobs_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def jobs_submit(
    kind: Annotated[
        str, typer.Argument(help="Job kind (entry-point group reflade.jobs), e.g. doctor, registry.")
    ],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments of the job, after `--`.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the logs until the job ends.")
    ] = False,
    submission_id: Annotated[str | None, typer.Option(help="Job id to use (default: generated).")] = None,
) -> None:
    """Run job KIND on the Ray cluster with this package shipped as a wheel: `reflade jobs submit KIND -- ARGS`."""
    jobs = _jobs()
    job_id = jobs.submit(kind, list(args or []), submission_id=submission_id)
    console.print(f"submitted {kind} as {job_id} to {jobs.url}")
    if follow:
        for chunk in jobs.follow(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        final = jobs.wait(job_id)
        console.print(f"job {job_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)
    else:
        print(job_id)


@jobs_app.command("status")
def jobs_status(job_id: str, as_json: JsonOpt = False) -> None:
    """Status of one job."""
    st = _jobs().status(job_id)
    if as_json:
        _print_json(st)
    else:
        console.print(f"{job_id}: {st['status']}  {st['message'] or ''}")


@jobs_app.command("ls")
def jobs_ls(as_json: JsonOpt = False) -> None:
    """Jobs known to the cluster."""
    rows = _jobs().list()
    if as_json:
        _print_json(rows)
        return
    table = Table("job", "status", "entrypoint")
    for r in rows:
        table.add_row(r["job_id"], r["status"], r["entrypoint"])
    console.print(table)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
) -> None:
    """Logs of one job."""
    jobs = _jobs()
    if follow:
        for chunk in jobs.follow(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(jobs.logs(job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str) -> None:
    """Stop a running job."""
    stopped = _jobs().stop(job_id)
    console.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@jobs_app.command("kinds")
def jobs_kinds(as_json: JsonOpt = False) -> None:
    """Job kinds this installation knows (entry-point group reflade.jobs)."""
    from reflade.platform.jobs import job_kinds

    kinds = job_kinds()
    if as_json:
        _print_json(kinds)
        return
    for k, v in sorted(kinds.items()):
        console.print(f"{k:20s} {v}")


def registry_job(argv: list[str]) -> int:
    """Job kind ``registry``: run ``reflade registry ARGS`` on the cluster (e.g. ``gc --delete``)."""
    return run_typer(registry_app, argv, "reflade registry")


def run_typer(typer_app: typer.Typer, argv: list[str], prog: str) -> int:
    """Run a Typer app as a job's main: usage errors and the platform's known errors end with their message and
    a non-zero exit code, not a traceback."""
    cmd = typer.main.get_command(typer_app)
    try:
        cmd.main(args=argv, prog_name=prog, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except typer.Exit as e:
        return e.exit_code
    except _click_errors() as e:
        e.show()
        return e.exit_code
    except _known_errors() as e:
        err_console.print(f"[red]error[/]: {type(e).__name__}: {escape(str(e))}", highlight=False)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- plug-ins
app.add_typer(config_app, name="config")
app.add_typer(registry_app, name="registry")
app.add_typer(jobs_app, name="jobs")


_PLUGINS_ADDED: set[tuple[str, str]] = set()  # (name, value) already added: main() may run twice in a process


def _load_plugins() -> list[str]:
    """Add every ``reflade.commands`` entry point as a top-level command; returns problems found."""
    problems = []
    taken = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for ep in entry_points(group="reflade.commands"):
        if (ep.name, ep.value) in _PLUGINS_ADDED:
            continue
        if ep.name in taken:
            problems.append(f"command {ep.name!r} from {ep.value} clashes with an existing command; skipped")
            continue
        try:
            sub = ep.load()
        except Exception as e:  # a broken plug-in must not take the whole CLI down
            problems.append(f"command {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}")
            continue
        if not isinstance(sub, typer.Typer):
            problems.append(f"command {ep.name!r} ({ep.value}) is not a Typer app; skipped")
            continue
        app.add_typer(sub, name=ep.name)
        taken.add(ep.name)
        _PLUGINS_ADDED.add((ep.name, ep.value))
    return problems


def _known_errors() -> tuple[type[BaseException], ...]:
    from reflade.platform.errors import ReportedError
    from reflade.platform.jobs import JobError
    from reflade.platform.registry import RegistryError
    from reflade.platform.stack import StackError
    from reflade.platform.storage import StorageError

    return (ConfigError, RegistryError, StorageError, StackError, JobError, ReportedError)


def _config_option(args: list[str]) -> str | None:
    """The value of the root ``--config``/``-c`` option in ``args`` (before the command name), if given."""
    it = iter(args)
    for arg in it:
        if arg in ("--config", "-c"):
            return next(it, None)
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg.startswith("-c") and len(arg) > 2:
            return arg[2:]
        if not arg.startswith("-"):
            break
    return None


def _prepare_ray_client(args: list[str]) -> None:
    """Before any command group can import Ray: if the configured Ray target is the embedded head of
    ``reflade up``, put the variables Ray reads once (token auth, loopback) in this process's environment.

    Done here, for every command, so that each command that connects (engine, data, train, jobs, and those to
    come) reaches the head from a fresh shell. A broken configuration is left to the command to report.
    """
    from reflade.platform.stack import StackError

    try:
        cfg = load_config(_config_option(args))
    except ConfigError:
        return
    from reflade.platform.cluster import use_embedded_head

    try:
        use_embedded_head(cfg)
    except (StackError, OSError, KeyError, ValueError):
        return  # a stale or unreadable stack.json: `reflade status` says what is wrong


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    _prepare_ray_client(list(sys.argv[1:] if argv is None else argv))
    for problem in _load_plugins():
        err_console.print(f"[yellow]warning[/]: {problem}")
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv, prog_name="reflade", standalone_mode=False)
    except _known_errors() as e:
        err_console.print(f"[red]error[/]: {type(e).__name__}: {escape(str(e))}", highlight=False)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except _click_errors() as e:
        e.show()
        return e.exit_code
    return 0


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage errors: click's own and typer's vendored copy (typer >= 0.2x raises the latter)."""
    import click

    errors: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException
    except ImportError:
        pass
    else:
        errors.append(VendoredClickException)
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
