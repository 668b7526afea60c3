"""`serveless pack`: images into TFRecord records, with labels.json beside them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..store import Store
from .app import app
from .common import (
    StoreOptions,
    guarded,
    parse_options,
    say,
)


@app.command()
def pack(
    src: Annotated[str, typer.Argument(
        help="folder, glob or URL of JPEG/PNG/WebP/BMP/TIFF/GIF images (subfolders = labels)")],
    dest: Annotated[str, typer.Argument(help="folder or fsspec URL for the .tfrecord files")],
    per_record: Annotated[int, typer.Option("--per-record", help="images per record")] = 1000,
    overwrite: Annotated[bool, typer.Option(
        help="delete the records already in DEST first (else they are refused)")] = False,
    store_option: StoreOptions = None,
) -> None:
    """Pack images into TFRecord files, with labels.json (the class names) beside them."""
    from ..data.sources import pack_source

    def go() -> Any:
        st = Store(dest, parse_options(store_option))
        st.check()
        return pack_source(src, st, per_record, overwrite, options=parse_options(store_option))

    print_packed(guarded(go), dest)


def print_packed(done: Any, dest: str) -> None:
    """What pack did: counts, the class -> label table, every skipped file and why."""
    if done.removed:
        say(f"removed {done.removed} old records/labels files from {dest}")
    say(f"packed {done.images} images into {len(done.records)} records in {dest}")
    if done.classes:
        say(f"labels ({len(done.classes)} classes, written to labels.json):")
        for label, name in enumerate(done.classes):
            say(f"  {label}  {name}")
    else:
        say("no class subfolders: images are unlabelled (label -1)")
    if done.skipped:
        say(f"skipped {len(done.skipped)} files:")
        for name, reason in done.skipped:
            say(f"  {name}: {reason}")


