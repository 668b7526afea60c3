"""Preparing a job in the store: validate everything, partition the model (or find its
stages already made), lay out job.json, the stage models and the records.

Nothing is written before every check has passed: the arguments, the model, every record's
framing, and on a resume that the new settings may be mixed with the outputs already there
(spec.check_resumable).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..data.tensors import TensorFormat
from ..errors import JobError
from ..store import JobLayout, Store
from ..store.layout import record_name, record_suffix
from .log import save_driver_requests
from .progress import FetchProgress
from .spec import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MICRO_BATCH,
    DEFAULT_MODEL,
    DEFAULT_RETRIES,
    MAY_CHANGE_ON_RESUME,
    JobSpec,
    check_resumable,
    flag,
    parse_memory,
)


def check_job_folder(store: Store, layout: JobLayout, is_job: bool, source: str | None,
                     options: dict[str, Any] | None = None,
                     records_placed: bool = False) -> None:
    """Refuse, before anything is written, a job whose folder would hold or touch data that
    is not the job's: a folder of that name that is not a job (no job.json), or an input
    that is the job's folder, lies inside it or holds it. A job writes, replaces and (on a
    failed setup, or `jobs delete`) deletes objects in its folder. `records_placed`: the
    caller has put the job's records in place itself (the demo), the folder's only content."""
    where = f"{store.url.rstrip('/')}/{layout.job}"
    found = [k for k in store.find(layout.job) if k != layout.lease] if not is_job else []
    if records_placed:
        found = [k for k in found if not k.startswith(layout.records_prefix + "/")]
    if found:
        raise JobError(f"{where} already holds objects but no job.json: it is not a "
                       "serveless job, and a job may not write into it; give another --job")
    if source and _overlap(store, layout.job, source, options):
        raise JobError(f"--input {source} and the job's folder {where} overlap (one is, or "
                       "holds, the other): a job writes and deletes in its folder; keep the "
                       "input elsewhere, or give another --job")


def _overlap(store: Store, folder: str, source: str, options: dict[str, Any] | None) -> bool:
    """Whether an input (folder, file, glob or URL) and a folder of the store share objects:
    the same file system, and one path equal to or under the other."""
    from ..data.sources import input_location

    fs, path = input_location(source, options)
    if set(_protocols(fs)) & set(_protocols(store.fs)) == set():
        return False
    if any(ch in path for ch in "*?["):  # a glob: the folder it searches
        path = path[:min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    mine = store.path(folder)
    if store.local:
        mine, path = os.path.realpath(mine), os.path.realpath(path)
    mine, path = mine.rstrip("/"), path.rstrip("/")
    return mine == path or path.startswith(mine + "/") or mine.startswith(path + "/")


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    found = (proto,) if isinstance(proto, str) else tuple(proto)
    return tuple("s3" if p == "s3a" else p for p in found)


def resolve_scores(model: Any, softmax: str) -> str:
    """--softmax auto|always|never -> what rows say their scores are (function.SCORES)."""
    from ..model.graph import output_is_distribution

    if softmax not in ("auto", "always", "never"):
        raise JobError(f"--softmax must be auto, always or never, got {softmax!r}")
    probs = output_is_distribution(model)
    if softmax == "always" or (softmax == "auto" and not probs):
        return "softmax(logits)"
    return "probs" if probs else "logits"


def prepare_job(
    store: Store,
    job: str,
    model: str | None = None,
    cuts: str | list[str] | None = None,
    preset: str | None = None,
    memory: str | list[int] | None = None,
    micro_batch: int | None = None,
    records: str | None = None,
    fmt: TensorFormat | None = None,
    concurrency: int | None = None,
    retries: int | None = None,
    say: Callable[[str], None] | None = None,
    quantize: str | None = None,
    weights: str | None = None,
    calibration_images: int = 64,
    *,
    per_record: int = 1000,
    input_options: dict[str, Any] | None = None,
    transform: dict[str, Any] | None = None,
    softmax: str | None = None,
    save_scores: bool | None = None,
    progress: Callable[[int], None] | None = None,
    records_placed: bool = False,
    label_key: str | None = None,
    columns: dict[str, str | None] | None = None,
    fetch_progress: bool = False,
    output: str | None = None,
    tensor: str | None = None,
) -> JobSpec:
    """Validate everything, partition the model, and lay the job out in the store.

    An argument left as None means "as the job already has it" (a resume), or the default
    for a new job; one that is given and differs from job.json is refused, except those in
    MAY_CHANGE_ON_RESUME, which are changed and said. Nothing is written before every
    check has passed.

    With `quantize` ('int8') or `weights` ('float16') the stages are reduced in precision
    (serveless.model.quantize), calibrated on the job's own records, and their fidelity to the
    fp32 model is recorded in job.json.

    The stage models are shared by every job of the same model and cuts in this store
    (`stagestore.py`): the first job partitions, checks and uploads them, later ones reuse
    them.

    `records` (run --input) is a folder, glob or URL of records or of plain images, told
    apart by content (sources.py); images are packed into the job's own records of
    `per_record`; records (TFRecord files, WebDataset shards) are copied as they are, and a
    job's records are all of one format. Every record's framing is checked before anything
    is written. `label_key`: the key of a shard's .json member that holds the label.
    Parquet image tables are packed into records as images are, their columns chosen by
    `columns` ({"image", "label", "id"}: --image-column, …) or found (data/parquet.py).
    A manifest (a CSV or JSONL file of image URLs, data/manifest.py) is read with
    `columns`' "url", "id" and "label"; its images are fetched in parallel and packed, with
    a progress bar on stderr when `fetch_progress`.

    `output` 'embeddings' stores every image's vector of `tensor` (the model's output when
    none is named) beside its row: the job runs the model up to that tensor
    (`partition.truncate`), cut at `cuts` before it.
    """
    from ..data.images import make_transform
    from ..data.manifest import check_manifest, manifest_examples
    from ..data.parquet import check_tables, table_examples
    from ..data.sources import (
        check_records,
        copy_record,
        labels_json,
        pack_examples,
        pack_images,
        read_labels,
        scan_inputs,
    )
    from ..errors import SourceError
    from ..model import quantize as q
    from ..model.graph import input_hw, make_batch_dynamic, preprocessing
    from ..model.loading import load_model_hashed
    from ..model.partition import check_tensor, partition, resolve_cuts, truncate
    from ..model.stagestore import ensure_stage_models

    say = say or _quiet
    layout = JobLayout(job)
    if micro_batch is not None and micro_batch < 1:
        raise JobError("--micro-batch must be >= 1")
    q.check_settings(quantize, weights, calibration_images)
    requests_before = store.requests.copy()
    store.check()
    old = JobSpec.load(store, job) if store.exists(layout.spec) else None
    check_job_folder(store, layout, old is not None, records, input_options,
                     records_placed=records_placed)
    model = model or (old.model if old else DEFAULT_MODEL)
    loaded, file_sha = load_model_hashed(model)
    onnx_model, fixed_batch = make_batch_dynamic(loaded)
    # the file's hash names the model only as it was read (not one made batch-dynamic)
    model_hash = file_sha if onnx_model is loaded else None
    expect = old.models if old is not None else None
    if cuts is None and preset is None and old is not None:
        cut_list = list(old.cuts)  # not asked again: as before, whatever named them then
    else:
        cut_list = resolve_cuts(model, cuts, preset)
    memory_list = None if memory in (None, "") else parse_memory(memory, len(cut_list) + 1)
    hw = list(input_hw(onnx_model))
    transform = dict(transform) if transform is not None else None
    crop = transform.pop("crop", None) if transform is not None else None
    if crop is not None and list(crop) != hw:
        raise JobError(f"--crop {crop[0]},{crop[1]} differs from the model's input "
                       f"{hw[0]}x{hw[1]}; the crop is the model's input size")
    default_transform = make_transform()
    if old is not None and not old.transform:
        old.transform = default_transform  # a job from before --preprocess: ImageNet's
    output = _given(output, old, "output", "predictions")
    tensor = _given(tensor, old, "tensor", "")
    if old is None or (old.output, old.tensor) == (output, tensor):  # else refused below
        _check_output(output, tensor, softmax, save_scores)
    # An inner tensor: the stages end at it, named by the file's hash and the tensor, and
    # the model is cut only where they are made (the split and a hash of what it leaves
    # took AlexNet to relu7 0.4 s each, on every run and resume)
    inner = bool(tensor) and check_tensor(onnx_model, tensor, cut_list)
    ends = {"tensor": tensor} if inner else {}

    def make_stages(m: Any, cuts: list[str]) -> list[Any]:
        return partition(truncate(m, tensor) if inner else m, cuts)

    if output == "embeddings":
        scores = "logits"  # the vectors as the tensor holds them; rows carry no scores
    elif softmax is None and old is not None:
        scores = old.scores
    else:
        scores = resolve_scores(onnx_model, softmax or "auto")
    asked = JobSpec(
        job=job, model=model, cuts=cut_list,
        memory=memory_list or (old.memory if old and len(old.memory) == len(cut_list) + 1
                               else parse_memory(None, len(cut_list) + 1)),
        micro_batch=_given(micro_batch, old, "micro_batch", DEFAULT_MICRO_BATCH),
        format=fmt.to_dict() if fmt else (old.format if old else TensorFormat().to_dict()),
        input_hw=list(input_hw(onnx_model)),
        concurrency=_given(concurrency, old, "concurrency", DEFAULT_CONCURRENCY),
        retries=_given(retries, old, "retries", DEFAULT_RETRIES),
        preprocess=preprocessing(onnx_model),
        precision=_given(q.mode_name(quantize, weights), old, "precision", "fp32"),
        transform=_given(transform, old, "transform", default_transform),
        scores=scores, fixed_batch=fixed_batch,
        save_scores=_given(save_scores, old, "save_scores", False),
        label_key=_given(label_key, old, "label_key", ""),
        output=output, tensor=tensor,
    )
    if old is not None:
        check_resumable(old, asked)
        for what in MAY_CHANGE_ON_RESUME:
            before, now = getattr(old, what), getattr(asked, what)
            if before != now:
                say(f"resuming with {flag(what, now)} (was {flag(what, before)})")
    try:
        inputs = scan_inputs(records, input_options) if records else None
        counts = check_records(inputs.records) if inputs else {}
        table_cols, url_col = _columns(columns, inputs)
        tables = (check_tables(inputs.tables, **table_cols)
                  if inputs and inputs.tables else None)
        manifest = (check_manifest(inputs.manifest, inputs.manifest_kind, url_col,
                                   table_cols.get("id"), table_cols.get("label"))
                    if inputs and inputs.manifest else None)
    except SourceError as exc:
        raise JobError(str(exc)) from exc
    if inputs and inputs.skipped:
        say(f"skipped {len(inputs.skipped)} files of {records} (neither records nor images):")
        for name, reason in inputs.skipped:
            say(f"  {name}: {reason}")
    record_format = _record_format(inputs, old, job)
    asked.record_format = record_format
    existing = {record_name(k, record_format)
                for k in store.list(layout.records_prefix, record_suffix(record_format))}

    def same(key: str, size: int, md5: Callable[[], str]) -> bool:
        """A record already in the job: fine if it has the same bytes (size, then MD5: a
        changed record of the same size too), refused if not."""
        name = record_name(key, record_format)
        if name not in existing:
            return False
        if store.size(key) != size or store.content_md5(key) != md5():
            raise JobError(f"job {job!r} already has a different record {name!r}; "
                           "use a new --job name")
        return True

    new = []
    if inputs:
        new = [f for f in inputs.records
               if not same(layout.record(f.record_name, record_format), f.size, f.md5)]
    if not counts and not (inputs and (inputs.images or inputs.tables or inputs.manifest)) \
            and not existing:
        raise JobError(f"job {job!r} has no records: pass --input")
    where = f"at {','.join(cut_list)}" if cut_list else "as one stage (no cuts)"
    label = f"{model} {where}"
    record_mb = sum(f.size for f in new) / 1e6
    names = set(existing)
    classes: list[str] | None = None

    def upload_inputs() -> None:
        """The job's records: the user's copied (every CRC checked), or their images packed."""
        nonlocal names, classes
        if inputs and inputs.records:
            for f in new:
                copy_record(f, store, layout.record(f.record_name, record_format))
            names |= set(counts)
            if inputs.labels_file is not None:
                classes = read_labels(inputs.labels_file.read(), inputs.labels_file.shown)
        elif inputs and inputs.images:
            say(f"packing {len(inputs.images)} images into records of {per_record}…")
            names |= set(pack_images(inputs.images, store, layout.records_prefix, per_record,
                                     progress=progress, exists=same))
            classes = inputs.classes or None
        elif inputs and tables is not None:
            table_columns, rows, table_classes = tables
            say(f"packing {rows} rows of {len(inputs.tables)} tables into records of "
                f"{per_record}…")
            names |= set(pack_examples(table_examples(inputs.tables, table_columns), store,
                                       layout.records_prefix, per_record, progress=progress,
                                       exists=same))
            classes = table_classes
        elif inputs and inputs.manifest is not None and manifest is not None:
            say(f"fetching {manifest.entries} images of {inputs.manifest.shown} into records "
                f"of {per_record}…")
            bar = FetchProgress(manifest.entries, fetch_progress)
            try:
                names |= set(pack_examples(
                    manifest_examples(inputs.manifest, manifest, input_options, bar.advance),
                    store, layout.records_prefix, per_record, progress=progress,
                    exists=same))
            finally:
                bar.close()
            classes = list(manifest.classes) if manifest.classes is not None else None

    if asked.precision == "fp32":
        # shared by jobs of the same model and cuts: partitioned (which checks equivalence
        # before anything is written) and uploaded once per store
        models = ensure_stage_models(store, onnx_model, cut_list, make_stages,
                                     extra=ends or None, say=say, label=label,
                                     model_hash=model_hash, expect=expect)
    else:  # calibration reads the job's records: upload them first
        if record_format != "tfrecord":
            raise JobError(f"--quantize and --weights calibrate on TFRecords; this job's "
                           f"records are {record_format} shards (pack their images with "
                           "`serveless pack` first)")
        if new:
            say(f"uploading {len(new)} records ({record_mb:,.1f} MB)…")
        upload_inputs()
        new = []
        asked.records = sorted(names)

        # calibrated and measured against the model the job runs: up to its tensor
        ran = truncate(onnx_model, tensor) if inner else onnx_model

        def fp32_stages() -> list[Any]:  # only when no cached reduced-precision set fits
            say(f"partitioning {label} and checking the chained stages against it…")
            return partition(ran, cut_list)

        stages, asked.quantize = _reduce_precision(store, layout, old, asked, ran,
                                                   fp32_stages, calibration_images, say,
                                                   None if inner else model_hash)
        # stored like fp32 stages, content-addressed by their calibrated cache key too
        models = ensure_stage_models(
            store, onnx_model, cut_list, lambda *_: stages,
            extra={"precision": asked.precision, "cache": asked.quantize.get("cache"),
                   **ends},
            model_hash=model_hash, expect=expect, machine_cache=False)
    if old is not None and old.models and old.models != models.prefix:
        raise JobError(f"job {job!r} was made with other stage models ({old.models}): the "
                       f"model {model} changed since; use a new --job")
    say(f"{'reused' if models.reused else 'uploaded'} {models.stages} stage "
        f"model{'s' if models.stages != 1 else ''} "
        f"({models.size / 1e6:,.1f} MB)"
        + (f"; uploading {len(new)} records ({record_mb:,.1f} MB)…" if new else ""))
    if asked.precision == "fp32":
        upload_inputs()
    if classes is not None:
        store.put_bytes(layout.labels, labels_json(classes))
    asked.classes = classes is not None or bool(old and old.classes)
    asked.records = sorted(names)
    asked.models = models.prefix
    asked.save(store)
    save_driver_requests(store, layout, requests_before)
    return asked


def _reduce_precision(store: Store, layout: JobLayout, old: JobSpec | None, asked: JobSpec,
                      onnx_model: Any, stages: Callable[[], list[Any]],
                      calibration_images: int, say: Callable[[str], None],
                      model_hash: str | None = None) -> tuple[list[Any], dict[str, Any]]:
    """int8 or float16-weight stages: a resumed job keeps the ones its outputs came from.
    `stages` makes the fp32 stages, called only when no cached set fits."""
    from ..model import quantize as q

    if old is not None:
        reused = q.load_cached(store, old.quantize, len(asked.cuts) + 1)
        if reused is not None:
            return reused, old.quantize
    say(f"{asked.precision} stages: calibrating and measuring fidelity on the job's images…"
        if asked.precision == "int8" else f"{asked.precision} stages…")
    openers = [(n, lambda n=n: store.open_read(layout.record(n))) for n in asked.records]
    quantize = asked.precision if asked.precision in q.QUANTIZE_MODES else None
    weights = "float16" if asked.precision == "fp16-weights" else None
    return q.prepare(store, onnx_model, asked.cuts, stages, openers, quantize, weights,
                     asked.input_hw, asked.preprocess, calibration_images,
                     model_hash=model_hash)


def _check_output(output: str, tensor: str, softmax: str | None,
                  save_scores: bool | None) -> None:
    """Options that have no meaning for the job's output are refused, not ignored."""
    from ..data.predictions import OUTPUTS

    if output not in OUTPUTS:
        raise JobError(f"--output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if output == "embeddings":
        if save_scores:
            raise JobError("--save-scores keeps the score vectors of predictions; an "
                           "embeddings job stores every image's vector already")
        if softmax not in (None, "never"):
            raise JobError("--softmax is for predictions; embeddings are stored as the "
                           "tensor holds them")
    elif tensor:
        raise JobError(f"--tensor {tensor} names the tensor of --output embeddings; add "
                       "--output embeddings")


def _quiet(_: str) -> None:
    pass


def _record_format(inputs: Any, old: JobSpec | None, job: str) -> str:
    """The format of the job's records: the input's records' (images are packed into
    TFRecords), else the job's own; a job's records are of one format, whatever resumes."""
    if inputs is not None and inputs.records:
        found = inputs.record_format
    elif inputs is not None:
        found = "tfrecord"  # images, packed
    else:
        return old.record_format if old is not None else "tfrecord"
    if old is not None and old.records and old.record_format != found:
        raise JobError(f"job {job!r} holds {old.record_format} records; its --input holds "
                       f"{found} records or images: give a new --job")
    return found


def _columns(columns: dict[str, str | None] | None, inputs: Any
             ) -> tuple[dict[str, str | None], str | None]:
    """(the table's columns, the manifest's location column) from --*-column: an option
    that the input's kind has no use for is refused, not ignored."""
    from ..errors import SourceError

    cols = {k: v for k, v in (columns or {}).items() if v is not None}
    url = cols.pop("url", None)
    if inputs is None:
        return cols, url
    if url is not None and inputs.manifest is None:
        raise SourceError(f"--url-column is for a manifest (a CSV or JSONL file of image "
                          f"URLs); {inputs.source} is not one")
    if cols.get("image") is not None and inputs.manifest is not None:
        raise SourceError("--image-column is for Parquet tables; a manifest's images are "
                          "named by --url-column")
    if inputs.manifest is None and not inputs.tables and cols:
        raise SourceError(f"--{next(iter(cols))}-column is for Parquet tables and "
                          f"manifests; {inputs.source} holds neither")
    return cols, url


def _given(value: Any, old: JobSpec | None, name: str, default: Any) -> Any:
    if value is not None:
        return value
    return getattr(old, name) if old is not None else default
