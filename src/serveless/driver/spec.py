"""job.json: what a job asked for, so that it can be resumed or reported from the store
alone, and the rules for what a resumed job may change.

A resumed job may change how it runs (`MAY_CHANGE_ON_RESUME`: memory, concurrency,
retries), never what it computes: the outputs already in the store were made with the
recorded settings, so any other difference is refused with the flag that would ask for
the recorded value (`flag`). Settings are compared on what they resolve to (cuts named by
--preset equal the same cuts named by --cuts), field by field, so a setting added to
job.json is checked without anyone remembering to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import __version__
from ..cost import check_memory
from ..data.predictions import OUTPUTS
from ..data.tensors import TensorFormat
from ..errors import JobError, StoreError
from ..store import JobLayout, Store
from ..store.layout import RECORD_SUFFIXES, record_file, record_name, stage_key

DEFAULT_MEMORY_MB = 1769
DEFAULT_MICRO_BATCH = 32
DEFAULT_CONCURRENCY = 2
DEFAULT_RETRIES = 3
DEFAULT_MODEL = "alexnet"
# What a resumed job may change: how it runs, not what it computes. Everything else in
# job.json must match (outputs in the store were made with it); `records` may grow.
MAY_CHANGE_ON_RESUME = ("memory", "concurrency", "retries")
# named, added to, or derived (from the model, from the stage store, or from labels found
# with the inputs)
NOT_ASKED = ("job", "records", "version", "input_hw", "preprocess", "quantize", "models",
             "classes", "fixed_batch", "record_format")


@dataclass
class JobSpec:
    """job.json: what was asked, so a job can be resumed or reported from the store alone."""

    job: str
    model: str
    cuts: list[str]
    memory: list[int]
    micro_batch: int = DEFAULT_MICRO_BATCH
    format: dict[str, Any] = field(default_factory=lambda: TensorFormat().to_dict())
    records: list[str] = field(default_factory=list)
    input_hw: list[int] = field(default_factory=lambda: [224, 224])
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    preprocess: dict[str, Any] = field(default_factory=dict)  # what the model declares
    precision: str = "fp32"  # or "int8", "fp16-weights" (serveless.model.quantize.mode_name)
    quantize: dict[str, Any] = field(default_factory=dict)  # quantize.prepare's info
    models: str = ""  # models/<digest>: the shared stage models; "" = <job>/model/ (older jobs)
    transform: dict[str, Any] = field(default_factory=dict)  # images.make_transform(); {}: ImageNet
    scores: str = "probs"  # probs | softmax(logits) | logits (see function.SCORES)
    classes: bool = False  # <job>/labels.json holds the class names of the labels
    fixed_batch: int | None = None  # the model's batch size when it could not be made dynamic
    save_scores: bool = False  # the last stage also writes <job>/scores/<r>.npy
    record_format: str = "tfrecord"  # the records' format (data/formats.py): found, not asked
    label_key: str = ""  # a WebDataset sample's .json key of its label; "": label, then cls
    output: str = "predictions"  # or "embeddings": <job>/embeddings/<r>.npy beside the rows
    tensor: str = ""  # the embeddings' tensor (run --tensor); "": the model's output
    version: str = __version__

    @property
    def stages(self) -> int:
        return len(self.cuts) + 1

    def stage_model_key(self, k: int) -> str:
        """Where stage k's graph is (its weights beside it, + .data)."""
        if self.models:
            return stage_key(self.models, k)
        return JobLayout(self.job).stage_model(k)

    def save(self, store: Store) -> None:
        store.put_bytes(JobLayout(self.job).spec, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, store: Store, job: str) -> JobSpec:
        layout = JobLayout(job)
        try:
            raw = store.get_bytes(layout.spec)
        except StoreError as exc:
            raise JobError(f"no job {job!r} in {store.url} (missing {layout.spec})") from exc
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise JobError(f"{store.url}/{layout.spec} is not JSON ({exc}): the job cannot be "
                           "read") from exc
        problem = _spec_problem(data, job)
        if problem:
            raise JobError(f"{store.url}/{layout.spec} is not a job's spec: {problem}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


_SPEC_TYPES: dict[str, Any] = {
    "job": str, "model": str, "cuts": list, "memory": list, "micro_batch": int, "format": dict,
    "records": list, "input_hw": list, "concurrency": int, "retries": int,
    "preprocess": dict, "precision": str, "quantize": dict, "models": str, "transform": dict,
    "scores": str, "classes": bool, "save_scores": bool, "version": str,
    "record_format": str, "label_key": str, "output": str, "tensor": str,
}


def _spec_problem(data: Any, job: str) -> str | None:
    """What is wrong with job.json as read (edited by hand, or not ours), or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for name in ("job", "model", "cuts", "memory"):
        if name not in data:
            return f"no {name!r}"
    for name, typ in _SPEC_TYPES.items():
        if name in data and not isinstance(data[name], typ):
            return f"{name!r} is a {type(data[name]).__name__}, not a {typ.__name__}"
    if data["job"] != job:
        return f"it names the job {data['job']!r}"
    if not all(isinstance(x, str) for x in data["cuts"] + data.get("records", [])):
        return "cuts and records must be names"
    unsafe = [r for r in data.get("records", []) if record_name(record_file(r)) != r]
    if unsafe:  # every key of a record is made from its name: it must stay in the job
        return f"record name {unsafe[0]!r} is not one a job makes"
    if data.get("output", "predictions") not in OUTPUTS:
        return f"output {data['output']!r} is not one of {', '.join(OUTPUTS)}"
    if data.get("record_format", "tfrecord") not in RECORD_SUFFIXES:
        return f"record_format {data['record_format']!r} is not one of {tuple(RECORD_SUFFIXES)}"
    if len(data["memory"]) != len(data["cuts"]) + 1 or not all(
            isinstance(m, int) and not isinstance(m, bool) for m in data["memory"]):
        return "memory must be one whole number of MB per stage"
    if "fixed_batch" in data and data["fixed_batch"] is not None and not isinstance(
            data["fixed_batch"], int):
        return "'fixed_batch' must be a number or null"
    return None


def parse_ints(text: str | Sequence[int], what: str) -> list[int]:
    """'100,250,500' -> [100, 250, 500]; every value must be a positive integer."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise JobError(f"{what} must be comma-separated integers, got {text!r}") from exc
    else:
        values = [int(v) for v in text]
    if not values or any(v < 1 for v in values):
        raise JobError(f"{what} must be one or more integers >= 1, got {text!r}")
    return values


def parse_memory(memory: str | list[int] | None, stages: int) -> list[int]:
    """'2048,1280,1024,768' (one per stage) or one value for all stages."""
    values = [DEFAULT_MEMORY_MB] if memory in (None, "") else parse_ints(memory, "--memory")
    if len(values) == 1:
        values = values * stages
    if len(values) != stages:
        raise JobError(f"--memory gives {len(values)} sizes for {stages} stages")
    try:
        return [check_memory(v) for v in values]
    except ValueError as exc:
        raise JobError(str(exc)) from exc


def flag(name: str, value: Any) -> str:
    """The command-line flag that asks for `value` of job.json's field `name`."""
    if name == "cuts":
        return f"--cuts {','.join(value)}" if value else "no --cuts (the whole model)"
    if name == "precision":
        return {"int8": "--quantize int8", "fp16-weights": "--weights float16"}.get(
            value, "no --quantize or --weights (fp32)")
    if name == "transform":
        nums = ",".join
        return (f"--preprocess {value['name']}" if value.get("name") != "custom" else
                f"--resize {value.get('resize')} --mean {nums(map(str, value['mean']))} "
                f"--std {nums(map(str, value['std']))}")
    if name == "scores":
        return f"--softmax giving {value}"
    if name == "label_key":
        return f"--label-key {value}" if value else "no --label-key"
    if name == "tensor":
        return f"--tensor {value}" if value else "no --tensor (the model's output)"
    if name == "save_scores":
        return "--save-scores" if value else "--no-save-scores"
    if name == "format":
        fmt = TensorFormat.from_dict(value)
        return " ".join([f"--{'' if fmt.dtype == 'float16' else 'no-'}float16",
                         f"--{'' if fmt.compress else 'no-'}compress"])
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"--{name.replace('_', '-')} {value}"


def check_resumable(old: JobSpec, asked: JobSpec) -> None:
    """Outputs already in the store were made with the old settings: refuse to mix.

    Compared field by field on what they resolve to (cuts named by --preset equal the
    same cuts named by --cuts), so every setting a job records is checked, new ones too.
    """
    skip = set(MAY_CHANGE_ON_RESUME) | set(NOT_ASKED)
    for name in old.__dataclass_fields__:
        before, now = getattr(old, name), getattr(asked, name)
        if name not in skip and before != now:
            raise JobError(
                f"job {old.job!r} was started with {flag(name, before)}, not "
                f"{flag(name, now)}: resume it with {flag(name, before)} (or leave the "
                "option out), or give a new --job")
