"""Cut a model into stages between named tensors.

A stage is a function with its own memory size, and the only thing that travels between
two stages is an object in the store. So a cut must be a tensor that alone separates the
graph: exactly one live tensor crosses from the nodes before it to the nodes after it.
Cutting across a skip connection would need two tensors in the store per record; such
points are refused, and every refusal lists the cuts that are valid.

Weights (initializers) and constant subgraphs (Constant nodes and nodes fed only by
constants) never count as crossing: they are copied into each stage that uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from serveless.model.graph import save_model
from serveless.model.presets import PAPER_PRESET

from ..errors import PartitionError
from ..store.layout import stage_file
from .sessions import in_memory_session, random_feeds, skeleton

# Ops whose output changes from run to run: never folded as constants (copying them into
# two stages would give two different draws).
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


@dataclass
class CutCandidate:
    """A tensor the model can be cut at, with what a record of it costs in the store.

    shape is the per-sample shape (batch dim dropped); bytes_per_sample is -1 when shape
    inference could not give static dims.
    """

    name: str
    shape: list
    bytes_per_sample: int
    op: str


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope names a subgraph (If/Loop/Scan body) reads: its implicit inputs."""
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(_node_inputs(node))
        defined.update(o for o in node.output if o)
    return used - defined


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit and implicit (subgraph) inputs of a node, empty optional slots dropped."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            names.extend(sorted(_subgraph_inputs(sub)))
    return names


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference and the checker: large initializers become typed inputs."""
    sk, big = skeleton(model)
    declared = {vi.name for vi in sk.graph.input}
    for init in big:
        if init.name not in declared:
            sk.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return sk


class _Graph:
    """The analysis behind list_cuts and split: constants, live nodes, valid cut points."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.sparse: dict[str, onnx.SparseTensorProto] = {
            t.values.name: t for t in g.sparse_initializer}
        self.real_inputs = [vi for vi in g.input
                            if vi.name not in self.inits and vi.name not in self.sparse]
        self.input_names = {vi.name for vi in self.real_inputs}
        self.output_names = [vi.name for vi in g.output]
        self.inputs_of = [_node_inputs(n) for n in self.nodes]

        # Constants: initializers and outputs of nodes fed only by constants.
        self.const: set[str] = set(self.inits) | set(self.sparse)
        self.const_producer: dict[str, int] = {}
        self.producer: dict[str, int] = {}
        self.is_const_node = [False] * len(self.nodes)
        for i, node in enumerate(self.nodes):
            if node.op_type not in _NONDETERMINISTIC and all(
                    x in self.const for x in self.inputs_of[i]):
                self.is_const_node[i] = True
                for o in node.output:
                    if o:
                        self.const.add(o)
                        self.const_producer[o] = i
            for o in node.output:
                if o:
                    self.producer[o] = i

        # Live nodes: those the graph outputs depend on.
        live: set[int] = set()
        stack = [o for o in self.output_names]
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            i = self.producer.get(t)
            if i is not None and i not in live:
                live.add(i)
                stack.extend(self.inputs_of[i])
        self.live = live

        # Non-constant live nodes in graph (= topological) order; a cut after position p
        # is valid iff exactly one tensor is produced at or before p and used after p.
        self.order = [i for i in range(len(self.nodes))
                      if i in live and not self.is_const_node[i]]
        self.pos: dict[str, int] = {}
        last_use: dict[str, int] = {}
        for p, i in enumerate(self.order):
            for x in self.inputs_of[i]:
                if x in self.const:
                    continue
                if x not in self.pos and x not in self.input_names:
                    raise PartitionError(
                        f"node {self.nodes[i].name or self.nodes[i].op_type!r} uses {x!r} "
                        "before any node produces it (the graph is not topologically "
                        "sorted, or the tensor is undefined)")
                last_use[x] = p
            for o in self.nodes[i].output:
                if o:
                    self.pos[o] = p
        end = len(self.order)
        for o in self.output_names:
            last_use[o] = end
        ends_at: dict[int, list[str]] = {}
        for t, p in last_use.items():
            ends_at.setdefault(p, []).append(t)
        open_: dict[str, None] = {t: None for t in self.input_names if t in last_use}
        self.crossing: list[list[str]] = []
        self.valid: dict[str, int] = {}
        for p, i in enumerate(self.order):
            for o in self.nodes[i].output:
                if o and last_use.get(o, -1) > p:
                    open_[o] = None
            for t in ends_at.get(p, []):
                open_.pop(t, None)
            names = list(open_)
            self.crossing.append(names)
            if (len(names) == 1 and self.pos.get(names[0]) == p
                    and names[0] not in self.output_names):
                self.valid[names[0]] = p

        self._inferred: dict[str, onnx.ValueInfoProto] | None = None

    # -- shapes -------------------------------------------------------------------------
    def value_infos(self) -> dict[str, onnx.ValueInfoProto]:
        """Inferred types and shapes of every tensor (computed once, weights stripped)."""
        if self._inferred is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(_strip_weights(self.model))
                g = inferred.graph
            except Exception:  # unknown custom ops and the like: fall back to declared
                g = self.model.graph
            self._inferred = {vi.name: vi for vi in
                              [*g.value_info, *g.input, *g.output]}
        return self._inferred

    def batch_dim(self) -> str | int:
        """The source's batch dim (name or size); 'N' when the source leaves it unnamed."""
        if self.real_inputs:
            shape = self.real_inputs[0].type.tensor_type.shape
            if shape.dim:
                d = shape.dim[0]
                if d.HasField("dim_param") and d.dim_param:
                    return d.dim_param
                if d.HasField("dim_value"):
                    return d.dim_value
        return "N"

    def cut_value_info(self, name: str) -> onnx.ValueInfoProto:
        """The cut tensor's value_info, its first dim set to the source's batch dim."""
        vi = self.value_infos().get(name)
        tt = vi.type.tensor_type if vi is not None else None
        if tt is None or not tt.elem_type:
            raise PartitionError(f"cannot infer the element type of cut tensor {name!r}")
        if not tt.HasField("shape"):
            return helper.make_tensor_value_info(name, tt.elem_type, None)
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tt.shape.dim]
        if dims:
            dims[0] = self.batch_dim()
        return helper.make_tensor_value_info(name, tt.elem_type, dims)

    # -- messages -----------------------------------------------------------------------
    def valid_list(self) -> str:
        return ", ".join(self.valid) if self.valid else "none (the model cannot be cut)"

    def why_invalid(self, name: str) -> str:
        """Why a tensor is not a cut, for the error message."""
        if name in self.input_names:
            return f"{name!r} is the model's input, not a cut point"
        if name in self.output_names:
            return f"{name!r} is the model's output, not a cut point"
        if name in self.const:
            return f"{name!r} is a weight or constant, not a cut point"
        if name not in self.producer:
            return f"unknown tensor {name!r}"
        if self.producer[name] not in self.live:
            return f"{name!r} does not lead to the model's output"
        others = [t for t in self.crossing[self.pos[name]] if t != name]
        shown = ", ".join(repr(t) for t in others[:5]) + (", ..." if len(others) > 5 else "")
        return (f"{name!r} is not a valid cut: {shown} also cross"
                f"{'es' if len(others) == 1 else ''} it (a skip connection or a parallel "
                "branch cannot be cut through)")


def _per_sample(vi: onnx.ValueInfoProto | None) -> tuple[list, int]:
    """(per-sample shape, bytes per sample or -1) of a tensor's inferred value_info."""
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return [], -1
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tt.shape.dim][1:]
    if not all(isinstance(d, int) for d in dims):
        return dims, -1
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    except Exception:  # undefined / string element types
        return dims, -1
    return dims, int(math.prod(dims)) * itemsize


def list_cuts(model: onnx.ModelProto) -> list[CutCandidate]:
    """Every tensor the model can be cut at, in topological order, with its size per sample.

    The size is what one sample costs in the store between two stages, the number that
    decides where a cut pays off.
    """
    g = _Graph(model)
    vis = g.value_infos()
    out = []
    for name, p in g.valid.items():
        shape, nbytes = _per_sample(vis.get(name))
        out.append(CutCandidate(name, shape, nbytes, g.nodes[g.order[p]].op_type))
    return out


def output_of(model: onnx.ModelProto) -> CutCandidate:
    """The model's (first) output as a candidate row: the default tensor of an embeddings
    job, with its size per sample."""
    out = model.graph.output[0]
    shape, nbytes = _per_sample(out)
    producer = next((n.op_type for n in model.graph.node if out.name in n.output), "")
    return CutCandidate(out.name, shape, nbytes, producer)


def _validate(g: _Graph, cuts: Sequence[str]) -> list[int]:
    """Positions of the cuts, or PartitionError listing the valid cuts."""
    positions: list[int] = []
    seen: set[str] = set()
    for c in cuts:
        if c in seen:
            raise PartitionError(f"cut {c!r} is given twice; valid cuts: {g.valid_list()}")
        seen.add(c)
        if c not in g.valid:
            raise PartitionError(f"{g.why_invalid(c)}; valid cuts: {g.valid_list()}")
        p = g.valid[c]
        if positions and p <= positions[-1]:
            prev = cuts[len(positions) - 1]
            raise PartitionError(f"cuts must be in topological order, but {c!r} comes before "
                                 f"{prev!r}; valid cuts in order: {g.valid_list()}")
        positions.append(p)
    return positions


def _stage_model(g: _Graph, k: int, node_ids: list[int], inputs: list[onnx.ValueInfoProto],
                 outputs: list[onnx.ValueInfoProto], n_stages: int) -> onnx.ModelProto:
    """One stage: its nodes, the constant subgraph they need, the weights they use."""
    # Close over constants: initializers and constant-node chains, copied per stage.
    needed_inits: list[str] = []
    const_nodes: set[int] = set()
    stack = [x for i in node_ids for x in g.inputs_of[i] if x in g.const]
    stack += [o.name for o in outputs if o.name in g.const]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.inits or t in g.sparse:
            needed_inits.append(t)
        elif t in g.const_producer:
            i = g.const_producer[t]
            if i not in const_nodes:
                const_nodes.add(i)
                stack.extend(g.inputs_of[i])
    nodes = [g.nodes[i] for i in sorted(const_nodes)] + [g.nodes[i] for i in node_ids]

    inside = {o for n in nodes for o in n.output if o}
    io = {vi.name for vi in inputs} | {vi.name for vi in outputs}
    value_info = [vi for vi in g.model.graph.value_info if vi.name in inside - io]
    src = g.model.graph
    graph = helper.make_graph(nodes, f"{src.name or 'model'}-stage-{k}", inputs, outputs,
                              value_info=value_info,
                              doc_string=f"stage {k} of {n_stages} cut from {src.name!r}")
    model = onnx.ModelProto()
    model.ir_version = g.model.ir_version
    model.opset_import.extend(g.model.opset_import)
    model.functions.extend(g.model.functions)
    model.producer_name = g.model.producer_name or "serveless"
    model.producer_version = g.model.producer_version
    model.domain = g.model.domain
    model.model_version = g.model.model_version
    model.graph.CopyFrom(graph)  # small: weights are appended below, copied once
    wanted = set(needed_inits)
    dense = [t.name for t in src.initializer if t.name in wanted]  # keep the source's order
    for name in dense:
        model.graph.initializer.append(g.inits[name])
    for t in src.sparse_initializer:
        if t.values.name in wanted:
            model.graph.sparse_initializer.append(t)
    if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        for name in dense:
            t = g.inits[name]
            model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, t.dims))
    return model


def split(model: onnx.ModelProto, cuts: Sequence[str]) -> list[onnx.ModelProto]:
    """Cut the model at the given tensors into len(cuts)+1 stage models.

    Stage k reads cuts[k-1] (stage 0 the model's input) and writes cuts[k] (the last stage
    the model's output). Stage inputs and outputs keep the source's batch dim (normally
    the symbolic 'N'), so a stage runs on any micro-batch size.
    """
    cuts = list(cuts)
    g = _Graph(model)
    positions = _validate(g, cuts)
    bounds = [-1, *positions, len(g.order) - 1]
    n_stages = len(cuts) + 1
    stages = []
    for k in range(n_stages):
        node_ids = g.order[bounds[k] + 1: bounds[k + 1] + 1]
        inputs = list(g.real_inputs) if k == 0 else [g.cut_value_info(cuts[k - 1])]
        outputs = (list(model.graph.output) if k == n_stages - 1
                   else [g.cut_value_info(cuts[k])])
        stage = _stage_model(g, k, node_ids, inputs, outputs, n_stages)
        try:  # checked without the weight bytes, which are verbatim copies of the source's
            onnx.checker.check_model(_strip_weights(stage))
        except onnx.checker.ValidationError as e:
            raise PartitionError(f"stage {k} is not a valid ONNX model: {e}") from e
        stages.append(stage)
    return stages


def check_tensor(model: onnx.ModelProto, tensor: str, cuts: Sequence[str] = ()) -> bool:
    """Whether `tensor` is an inner tensor an embeddings job (`run --output embeddings
    --tensor NAME`) can end at (True), or the model's output (False); PartitionError, with
    the candidates, for anything else. It must be a valid cut (everything after it depends
    on it alone, so the part before it is a model of its own: `split`'s stage 0), the
    candidates being `list_cuts`' (`partition MODEL --list`) and the output; the job's
    `cuts` must come before it, as its last stage ends at its tensor. Checked without
    splitting, so a job whose stages are already stored never pays for the split."""
    outputs = [o.name for o in model.graph.output]
    if tensor in outputs:
        return False
    g = _Graph(model)
    if tensor not in g.valid:
        raise PartitionError(f"--tensor {tensor!r}: {g.why_invalid(tensor)}; the tensors "
                             f"an embeddings job can store: {g.valid_list()}, or the "
                             f"model's output {outputs[0]!r} (serveless partition MODEL "
                             "--list)")
    late = [c for c in cuts if c in g.valid and g.valid[c] >= g.valid[tensor]]
    if late:
        raise PartitionError(f"cut {late[0]!r} is not before --tensor {tensor!r}: a job's "
                             "last stage ends at its tensor; cut before it")
    return True


def truncate(model: onnx.ModelProto, tensor: str, cuts: Sequence[str] = ()
             ) -> onnx.ModelProto:
    """The model up to `tensor` (checked by `check_tensor`), which becomes its output:
    what an embeddings job runs and partitions at `cuts`."""
    return split(model, [tensor])[0] if check_tensor(model, tensor, cuts) else model


def same_graph(model: onnx.ModelProto, stage: onnx.ModelProto) -> bool:
    """Whether `stage` is the model's own graph: the same nodes in the same order, the same
    inputs, outputs, weights (byte for byte), opsets, functions and IR version.

    The one stage of an uncut model normally is; it then computes exactly what the model
    computes, and the equivalence check need not load both into onnxruntime (about 1 s for
    AlexNet). Anything else (a reordered or pruned graph, sparse weights) returns False and
    is checked by running it.
    """
    a, b = model.graph, stage.graph
    if (model.ir_version != stage.ir_version or list(model.opset_import) != list(
            stage.opset_import) or list(model.functions) != list(stage.functions)):
        return False
    if a.sparse_initializer or b.sparse_initializer or list(a.node) != list(b.node):
        return False
    inits = {t.name: t for t in a.initializer}
    real = [vi for vi in a.input if vi.name not in inits]
    if real != list(b.input) or list(a.output) != list(b.output):
        return False
    used = {x for n in b.node for x in _node_inputs(n)}
    for t in b.initializer:
        if t.name not in inits or t != inits[t.name]:  # upb compares in C, bytes too
            return False
    # weights the model's nodes read must all be there (split copies those it needs)
    have = {t.name for t in b.initializer}
    return all(name in have for name in used if name in inits)


def check_equivalence(model: onnx.ModelProto, stages: Sequence[onnx.ModelProto],
                      batch: int = 2, seed: int = 0, atol: float = 1e-4) -> float:
    """Run the whole model and the chained stages on the same random batch; max abs diff.

    This is the guarantee the pipeline rests on: serving the stages one after another
    gives the whole model's answer. Raises PartitionError if the diff exceeds atol. A single
    stage that is the model's own graph (`same_graph`) is exact by construction: 0.0.
    """
    if len(stages) == 1 and same_graph(model, stages[0]):
        return 0.0
    feeds = random_feeds(model, batch, seed)
    sess = in_memory_session(model, prepack=False)
    names = [o.name for o in sess.get_outputs()]
    whole = dict(zip(names, sess.run(names, feeds), strict=True))
    del sess
    values: dict[str, np.ndarray] = dict(feeds)
    for k, stage in enumerate(stages):
        try:
            sess = in_memory_session(stage, prepack=False)
            feed = {i.name: values[i.name] for i in sess.get_inputs()}
            outs = [o.name for o in sess.get_outputs()]
            values.update(zip(outs, sess.run(outs, feed), strict=True))
        except KeyError as e:
            raise PartitionError(f"stage {k} needs {e.args[0]!r}, which no earlier stage "
                                 "produces") from e
        except Exception as e:  # onnxruntime load or run failure
            raise PartitionError(f"stage {k} failed to run: {e}") from e
        del sess
    diffs = [0.0]
    for name, ref in whole.items():
        if name not in values:
            raise PartitionError(f"no stage produces the model output {name!r}")
        got = values[name]
        if got.shape != ref.shape:
            raise PartitionError(f"chained stages give {name!r} shape "
                                 f"{'×'.join(map(str, got.shape))}, the whole model "
                                 f"{'×'.join(map(str, ref.shape))}")
        if ref.size:
            diffs.append(float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))))
    diff = float("nan") if any(math.isnan(d) for d in diffs) else max(diffs)
    if not diff <= atol:
        raise PartitionError(f"chained stages differ from the whole model: "
                             f"max abs diff {diff:.3g} > {atol:g}")
    return diff


def partition(model: onnx.ModelProto, cuts: Sequence[str], out_dir: str | Path | None = None,
              check: bool = True) -> list[onnx.ModelProto]:
    """Split, check the stages reproduce the model, and write out_dir/stage-<k>.onnx."""
    stages = split(model, cuts)
    if check:
        check_equivalence(model, stages)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for k, stage in enumerate(stages):
            save_model(stage, out / stage_file(k))
    return stages


def resolve_cuts(model_name: str, cuts: str | Sequence[str] | None,
                 preset: str | None) -> list[str]:
    """The cut list from the command line: explicit names, a preset, or none (one stage)."""
    if preset is not None and cuts:
        raise PartitionError("give either cuts or a preset, not both")
    if preset is not None:
        if preset != "paper":
            raise PartitionError(f"unknown preset {preset!r} (known: paper)")
        key = str(model_name).lower()
        if key not in PAPER_PRESET:
            raise PartitionError(
                f"--preset paper is only defined for {', '.join(sorted(PAPER_PRESET))}")
        return list(PAPER_PRESET[key])
    if cuts is None:
        return []
    items = cuts.split(",") if isinstance(cuts, str) else list(cuts)
    return [c.strip() for c in items if c.strip()]
