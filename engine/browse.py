"""Datasets for people: export rows to a browsable folder, import such a folder back, count what a version holds.

An exported sample is a folder ``<split>/<kind>/<sample_id>/`` with ``image.png``, ``layer.png`` (RGBA),
``layer_on_checkerboard.png``, ``visible_mask.png``, ``prompts.png`` (the prompts drawn over the image), one
``prompt_<k>_mask.png`` per mask prompt, and ``sample.json`` (every other column). ``import_folder`` reads
exactly that layout back, so a person can curate an export (delete bad samples, fix a mask) and import it as
the ``quality`` split.

Both refuse any path that would leave their folder, before they write or register anything: an export checks every
row first (its ``sample_id``, ``split`` and ``kind`` name its folder; ``validate_row`` holds them to the schema's
values), an import resolves every file it reads (symbolic links followed) and refuses one outside its sample
folder (a mask named ``/etc/passwd`` or ``../../x`` in ``sample.json``) or a sample folder outside ``src``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from reflade.engine.schema import (
    SCHEMA_VERSION,
    SchemaError,
    decode_image,
    encode_png,
    quoted,
    validate_row,
)


def checkerboard(h: int, w: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    light = (yy // cell + xx // cell) % 2 == 0
    return np.where(light[..., None], 204, 153).astype(np.uint8).repeat(3, axis=2)


def over_checkerboard(rgba: np.ndarray) -> np.ndarray:
    h, w = rgba.shape[:2]
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + checkerboard(h, w).astype(np.float32) * (1 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def draw_prompts(image: np.ndarray, prompts: list[dict[str, Any]]) -> np.ndarray:
    """The image with each prompt drawn: boxes green, mask red tint, points (positive green, negative red)."""
    import cv2

    out = image.copy()
    for p in prompts:
        if p.get("mask") is not None:
            m = decode_image(p["mask"], "L") >= 128
            out[m] = (0.6 * out[m] + 0.4 * np.array([255, 0, 0])).astype(np.uint8)
    for p in prompts:
        if p.get("box") is not None:
            x0, y0, x1, y1 = p["box"]
            cv2.rectangle(out, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), (0, 255, 0), 1)
        for x, y, label in p.get("points") or []:
            cv2.circle(out, (int(x), int(y)), 3, (0, 255, 0) if label else (255, 0, 0), -1)
    return out


def _inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved (symbolic links followed) if it stays under ``root`` (itself resolved).

    Raises:
        SchemaError: naming ``what`` and ``root``.
    """
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise SchemaError(f"{what} leaves {root}: refused")
    return resolved


def export_rows(rows: list[dict[str, Any]], dest: Path) -> int:
    """Write rows as browsable sample folders under ``dest``; returns the number written.

    Raises:
        SchemaError: a row does not follow the format or its folder would leave ``dest`` (a ``sample_id`` of
            ``../x``, a link inside ``dest``); every row is checked first, so nothing is written then.
    """
    dest = Path(dest)
    root = dest.resolve()
    folders = []
    for row in rows:
        validate_row(row, decode=False)  # sample_id, split and kind become the folder's path
        folder = dest / row["split"] / row["kind"] / row["sample_id"]
        _inside(root, folder, f"sample {row['sample_id']}: folder {folder}")
        folders.append(folder)
    dest.mkdir(parents=True, exist_ok=True)
    index = []
    for row, folder in zip(rows, folders, strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        image = decode_image(row["image"], "RGB")
        layer = decode_image(row["layer"], "RGBA")
        (folder / "image.png").write_bytes(encode_png(image))
        (folder / "layer.png").write_bytes(row["layer"])
        (folder / "layer_on_checkerboard.png").write_bytes(encode_png(over_checkerboard(layer)))
        (folder / "visible_mask.png").write_bytes(row["visible_mask"])
        (folder / "prompts.png").write_bytes(encode_png(draw_prompts(image, row["prompts"])))
        prompts = []
        for k, p in enumerate(row["prompts"]):
            q = {key: p[key] for key in ("type", "granularity", "points", "box", "text")}
            if p.get("mask") is not None:
                q["mask"] = f"prompt_{k}_mask.png"
                (folder / q["mask"]).write_bytes(p["mask"])
            else:
                q["mask"] = None
            prompts.append(q)
        meta = {
            k: row[k]
            for k in (
                "schema_version",
                "sample_id",
                "source_id",
                "source_sha256",
                "width",
                "height",
                "kind",
                "category",
                "split",
                "scores",
                "provenance",
            )
        }
        meta["prompts"] = prompts
        (folder / "sample.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        index.append(
            {
                "sample_id": row["sample_id"],
                "path": str(folder.relative_to(dest)),
                "kind": row["kind"],
                "category": row["category"],
                "split": row["split"],
            }
        )
    (dest / "index.json").write_text(json.dumps(index, indent=1))
    return len(rows)


def _read_in_folder(folder: Path, own: Path, name: Any, what: str) -> bytes:
    """The bytes of file ``name`` of sample ``folder`` (``own``: the folder resolved), if it stays inside."""
    if not isinstance(name, str) or not name:
        raise SchemaError(f"sample folder {folder}: {what} must be a file name, not {quoted(name, 200)}")
    return _inside(own, folder / name, f"sample folder {folder}: {what} {quoted(name, 200)}").read_bytes()


def import_folder(src: Path, split: str | None = "quality") -> list[dict[str, Any]]:
    """Read sample folders (as ``export_rows`` writes them) back into validated rows.

    Args:
        split: the split to give every row (``quality`` for hand-curated data); None keeps each sample's own.

    Raises:
        SchemaError: a sample folder is incomplete, its content does not follow the format, or a path in it
            leaves its folder (names the folder and the path). Nothing is returned then: one bad sample refuses
            the whole import.
    """
    rows = []
    root = Path(src).resolve()
    folders = sorted(p.parent for p in Path(src).rglob("sample.json"))
    if not folders:
        raise SchemaError(f"{src} holds no sample folders (no sample.json found)")
    for folder in folders:
        own = _inside(root, folder, f"sample folder {folder}")

        def read(name: Any, what: str) -> bytes:
            return _read_in_folder(folder, own, name, what)  # noqa: B023 (called within this iteration)

        try:
            meta = json.loads(read("sample.json", "sample.json"))
            prompts = []
            for k, p in enumerate(meta["prompts"]):
                q = dict(p)
                q["mask"] = read(p["mask"], f"prompt {k}'s mask") if p.get("mask") else None
                prompts.append(q)
            image = decode_image(read("image.png", "image.png"), "RGB")
            row = {
                "schema_version": meta.get("schema_version", SCHEMA_VERSION),
                "sample_id": meta["sample_id"],
                "source_id": meta["source_id"],
                "source_sha256": meta["source_sha256"],
                "image": encode_png(image),
                "width": image.shape[1],
                "height": image.shape[0],
                "layer": read("layer.png", "layer.png"),
                "visible_mask": read("visible_mask.png", "visible_mask.png"),
                "kind": meta["kind"],
                "category": meta["category"],
                "prompts": prompts,
                "split": split or meta["split"],
                "scores": meta.get("scores") or {},
                "provenance": meta.get("provenance") or {},
            }
            validate_row(row, decode=True)
        except SchemaError:
            raise
        # A broken or hostile sample.json (missing keys, wrong types), an unreadable or undecodable file.
        except (OSError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise SchemaError(f"sample folder {folder}: {type(e).__name__}: {e}") from None
        rows.append(row)
    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SchemaError(f"{src}: the same sample_id appears in two folders")
    return rows


def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by split, kind, category and prompt type."""
    prompt_types: Counter[str] = Counter()
    for r in rows:
        for p in r["prompts"]:
            prompt_types[f"{p['type']}/{p['granularity']}"] += 1
    return {
        "rows": len(rows),
        "sources": len({r["source_id"] for r in rows}),
        "by_split": dict(Counter(r["split"] for r in rows)),
        "by_kind": dict(Counter(r["kind"] for r in rows)),
        "by_category": dict(Counter(r["category"] for r in rows).most_common()),
        "by_prompt_type": dict(sorted(prompt_types.items())),
    }
