"""Elastic's eland / ELSER TorchScript archives, read as data and never run.

Air-gapped Elasticsearch installs hold ELSER as three files that share a stem: ``NAME.pt`` (a
TorchScript archive), ``NAME.vocab.json`` (``{"vocabulary": [tokens in id order]}``) and
``NAME.metadata.json`` (Elasticsearch's model-package config, whose
``inference_config.text_expansion.tokenization.bert`` holds ``do_lower_case`` and
``max_sequence_length``). ``import_eland_archive`` turns them into an ordinary model directory:
``BertForMaskedLM`` weights as safetensors, config.json, a WordPiece tokenizer.json and infercore.json.

What eland writes for text_expansion (eland/ml/pytorch/transformers.py, traceable_model.py):
``AutoModelForMaskedLM`` (``torchscript=True``) traced as it is on (input_ids, attention_mask,
token_type_ids, position_ids), then ``torch.jit.freeze``: the weights become anonymous constants in
``constants.pkl`` and the archive's code names them ``CONSTANTS.cN``. ELSER's own archive returns one
pooled vocab vector per input instead of per-token logits; pooling adds ops but no weights, so both
read the same way. An archive that was traced but not frozen keeps its weights as named module
attributes in ``data.pkl``; that layout is read too.

A TorchScript archive is a zip of pickles, TorchScript source and raw storages. ``torch.jit.load`` or
``torch.load`` would run its code and resolve whatever globals its pickles name, so this module reads
the zip itself: an unpickler that resolves only what tensor storage needs (everything else is refused
by name), storages copied from the zip entries, and the source parsed with ``ast`` (never compiled or
executed) to learn what the pickles do not say: which constant is which weight in a frozen module,
the attention head size (the last dimension of the attention's ``view`` to [batch, tokens, heads,
head_size]), the LayerNorm epsilon and the activation.

Refused with a reason: quantized archives (ELSER's ``_linux-x86_64`` build), tasks other than
text_expansion, tokenizations other than ``bert`` (WordPiece), non-GELU models, big-endian archives.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .bert import MLM_HEAD_WEIGHTS
from .checkpoint import CheckpointError

log = logging.getLogger("infercore.models")

MODEL_DIR_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "infercore.json")
CACHE_DIR_ENV = "INFERCORE_CACHE_DIR"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Elasticsearch's defaults for a `bert` tokenization block that leaves a field out.
ES_DEFAULT_DO_LOWER_CASE = False
ES_DEFAULT_MAX_SEQUENCE_LENGTH = 512


class ElandArchiveError(CheckpointError):
    """An eland archive that cannot be read or converted; the message says why in plain words."""


# ---- the three-file layout ----------------------------------------------------------------------

@dataclass(frozen=True)
class ElandFiles:
    pt: Path
    vocab: Path
    metadata: Path

    @property
    def stem(self) -> str:
        return self.pt.stem


def find_eland_archive(path: str | Path) -> ElandFiles | None:
    """``NAME.pt`` with ``NAME.vocab.json`` and ``NAME.metadata.json`` beside it, given the ``.pt``
    itself or a directory holding exactly one ``.pt``; None for anything else."""
    path = Path(path)
    if path.is_dir():
        candidates = [p for p in path.glob("*.pt") if p.is_file()]
        if len(candidates) != 1:
            return None
        pt = candidates[0]
    elif path.is_file() and path.suffix == ".pt":
        pt = path
    else:
        return None
    vocab = pt.with_name(pt.stem + ".vocab.json")
    metadata = pt.with_name(pt.stem + ".metadata.json")
    if vocab.is_file() and metadata.is_file():
        return ElandFiles(pt, vocab, metadata)
    return None


# ---- restricted reading of a TorchScript zip -----------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_QUANTIZED_GLOBALS = {
    ("torch._utils", "_rebuild_qtensor"), ("torch", "QInt8Storage"), ("torch", "QUInt8Storage"),
    ("torch", "QInt32Storage"), ("torch", "QUInt4x2Storage"), ("torch", "QUInt2x4Storage"),
}


class ScriptObject:
    """Inert stand-in for a pickled TorchScript object (a module or a TorchScript class): the class
    name and the state it was pickled with. Nothing of the archive's code is attached to it."""

    qualified_name: ClassVar[str] = ""
    state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> ScriptObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<ScriptObject {self.qualified_name}>"


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise ElandArchiveError("a pickled tensor refers to something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise ElandArchiveError(f"a pickled tensor has an invalid layout (size {size}, stride {stride})")
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise ElandArchiveError(f"a pickled tensor of size {size} reaches past its storage")
    return storage.as_strided(size, stride, storage_offset)


def _identity(value: Any, *_ignored: Any) -> Any:
    return value


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _identity,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Type tags and specialised lists of TorchScript's pickler: the value is already built.
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
}
_script_classes: dict[str, type[ScriptObject]] = {}


def _script_class(qualified_name: str) -> type[ScriptObject]:
    cls = _script_classes.get(qualified_name)
    if cls is None:
        cls = type(qualified_name.rsplit(".", 1)[-1], (ScriptObject,), {"qualified_name": qualified_name})
        _script_classes[qualified_name] = cls
    return cls


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals tensor storage needs; TorchScript classes become ``ScriptObject``s.
    Every other global (``os.system``, ``builtins.eval``, a class with a malicious ``__setstate__``...)
    is refused before anything of it runs."""

    def __init__(self, data: bytes, entry: str, load_storage: Callable[[str, torch.dtype, int], torch.Tensor]):
        super().__init__(io.BytesIO(data))
        self._entry = entry
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) in _QUANTIZED_GLOBALS:
            raise ElandArchiveError(
                f"{self._entry} holds quantized weights ({module}.{name}); quantized archives such as "
                "ELSER's _linux-x86_64 build are not supported, use the cross-platform build"
            )
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        raise ElandArchiveError(
            f"{self._entry} refers to the global {module}.{name}, which reading weights never needs; "
            "refusing the archive rather than resolving it"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ElandArchiveError(f"{self._entry} has a persistent id that is not a tensor storage ({pid!r:.80})")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, int(numel))


@dataclass
class TorchScriptArchive:
    """What a TorchScript zip holds, read without running any of it."""

    path: Path
    root: Any                   # data.pkl: the top module as a ScriptObject tree
    constants: tuple[Any, ...]  # constants.pkl: a frozen module's weights live here
    code: dict[str, str]        # path below code/ → TorchScript source text


def read_torchscript_archive(path: str | Path) -> TorchScriptArchive:
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ElandArchiveError(f"{path} is not a TorchScript archive ({exc})") from None
    with archive:
        names = archive.namelist()
        roots = {n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
        if len(roots) != 1:
            raise ElandArchiveError(f"{path} is a zip file but not a TorchScript archive (no top-level data.pkl)")
        prefix = roots.pop()
        present = set(names)
        if prefix + "byteorder" in present and archive.read(prefix + "byteorder").strip() != b"little":
            raise ElandArchiveError(f"{path} was written on a big-endian machine; only little-endian is read")
        storages: dict[str, torch.Tensor] = {}

        def storage_loader(tensor_dir: str) -> Callable[[str, torch.dtype, int], torch.Tensor]:
            def load(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
                if not re.fullmatch(r"[A-Za-z0-9_]+", key):
                    raise ElandArchiveError(f"{path}: storage key {key!r} is not a plain name")
                entry = next((prefix + d + key for d in (tensor_dir, "data/", "constants/")
                              if prefix + d + key in present), None)
                if entry is None:
                    raise ElandArchiveError(f"{path}: storage {key} is missing from the archive")
                if entry not in storages:
                    storages[entry] = _storage_from_bytes(archive.read(entry), dtype, numel, entry)
                return storages[entry]
            return load

        root = _unpickle(archive.read(prefix + "data.pkl"), "data.pkl", storage_loader("data/"))
        constants: Any = ()
        if prefix + "constants.pkl" in present:
            constants = _unpickle(
                archive.read(prefix + "constants.pkl"), "constants.pkl", storage_loader("constants/"))
        code_prefix = prefix + "code/"
        code = {
            n[len(code_prefix):]: archive.read(n).decode("utf-8")
            for n in names if n.startswith(code_prefix) and n.endswith(".py")
        }
    return TorchScriptArchive(path, root, tuple(constants) if isinstance(constants, (tuple, list)) else (), code)


def _unpickle(data: bytes, entry: str, load_storage: Callable[[str, torch.dtype, int], torch.Tensor]) -> Any:
    try:
        return _RestrictedUnpickler(data, entry, load_storage).load()
    except ElandArchiveError:
        raise
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "not readable"
        raise ElandArchiveError(f"{entry} in the archive is not readable ({type(exc).__name__}: {exc})") from None


def _storage_from_bytes(raw: bytes, dtype: torch.dtype, numel: int, entry: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel < 0 or len(raw) < numel * itemsize:
        raise ElandArchiveError(f"{entry} holds {len(raw)} bytes, fewer than {numel} {dtype} values")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(memoryview(raw)[: numel * itemsize]), dtype=dtype)


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor attribute of a pickled module tree, by dotted name."""
    state = obj.state if isinstance(obj, ScriptObject) else None
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(key), value
        elif isinstance(value, ScriptObject):
            yield from named_tensors(value, f"{prefix}{key}.")


# ---- reading the TorchScript source (ast only) ----------------------------------------------------

@dataclass(frozen=True)
class _Const:
    index: int
    transposed: bool = False


@dataclass(frozen=True)
class _Input:
    position: int


@dataclass
class _Embedding:
    weight: int
    indices: Any


@dataclass
class _LayerNorm:
    weight: int
    bias: int


@dataclass
class _Linear:
    weight: _Const   # transposed: the constant is stored [in, out] (pretransposed matmul/addmm)
    bias: int | None


@dataclass(frozen=True)
class _LinearOutput:
    linear: _Linear


@dataclass
class CodeFacts:
    """What the archive's source says about the architecture."""

    head_sizes: collections.Counter = field(default_factory=collections.Counter)
    layer_norm_eps: collections.Counter = field(default_factory=collections.Counter)
    gelu_approximate: collections.Counter = field(default_factory=collections.Counter)


def _call_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _parse_code(archive: TorchScriptArchive) -> dict[str, ast.Module]:
    trees = {}
    for name, source in archive.code.items():
        try:
            trees[name] = ast.parse(source, filename=name)
        except SyntaxError as exc:
            raise ElandArchiveError(f"{archive.path}: code/{name} is not TorchScript source ({exc})") from None
    return trees


def scan_code_facts(trees: dict[str, ast.Module], hidden_size: int) -> CodeFacts:
    """Head size from the attention's ``view``/``reshape`` to [batch, tokens, heads, head_size],
    LayerNorm epsilons and GELU flavours, from every function in the archive's source."""
    facts = CodeFacts()
    functions = [n for tree in trees.values() for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    for function in functions:
        # shapes are often built into a local first: `_14 = [_2, _0, -1, 16]; torch.view(x, _14)`
        lists = {
            n.targets[0].id: n.value for n in ast.walk(function)
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
            and isinstance(n.value, (ast.List, ast.Tuple))
        }
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            op = _call_name(node.func).rsplit(".", 1)[-1]
            args = list(node.args)
            kwargs = {kw.arg: kw.value for kw in node.keywords}
            shape = args[1] if len(args) >= 2 else kwargs.get("shape", kwargs.get("size"))
            if isinstance(shape, ast.Name):
                shape = lists.get(shape.id)
            if op in ("view", "reshape") and isinstance(shape, (ast.List, ast.Tuple)):
                dims = [_literal(e) for e in shape.elts]
                if len(dims) == 4 and isinstance(dims[3], int) and 0 < dims[3] <= hidden_size:
                    head_size, heads = dims[3], dims[2]
                    if hidden_size % head_size == 0 and (heads == -1 or heads * head_size == hidden_size):
                        facts.head_sizes[head_size] += 1
            elif op == "layer_norm":
                eps = args[4] if len(args) > 4 else kwargs.get("eps")
                value = _literal(eps) if eps is not None else None
                if isinstance(value, float):
                    facts.layer_norm_eps[value] += 1
            elif op == "gelu":
                approximate = args[1] if len(args) > 1 else kwargs.get("approximate")
                facts.gelu_approximate[_literal(approximate) if approximate is not None else "none"] += 1
    return facts


def _find_forward(trees: dict[str, ast.Module], qualified_name: str) -> ast.FunctionDef | None:
    module, _, class_name = qualified_name.rpartition(".")
    preferred = module.replace(".", "/") + ".py"
    ordered = sorted(trees, key=lambda name: name != preferred)
    for name in ordered:
        for node in trees[name].body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "forward":
                        return item
    return None


class _ForwardReader:
    """Walks a frozen forward in execution order (arguments before the call that uses them) and
    records the ops that consume weight constants. Purely symbolic: nothing is evaluated."""

    def __init__(self, forward: ast.FunctionDef):
        self.events: list[_Embedding | _LayerNorm | _Linear] = []
        self.env: dict[str, Any] = {}
        params = [a.arg for a in forward.args.args if a.arg != "self"]
        for position, name in enumerate(params):
            self.env[name] = _Input(position)
        for statement in forward.body:
            self._statement(statement)

    def _statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            value = self._eval(node.value)
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.env[target.id] = value
                elif isinstance(target, (ast.Tuple, ast.List)):
                    for element in target.elts:
                        if isinstance(element, ast.Name):
                            self.env[element.id] = None
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            value = self._eval(node.value)
            if isinstance(node.target, ast.Name):
                self.env[node.target.id] = value
        elif isinstance(node, (ast.Expr, ast.Return)) and node.value is not None:
            self._eval(node.value)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self._statement(child)
                elif isinstance(child, ast.expr):
                    self._eval(child)

    def _eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "CONSTANTS":
            match = re.fullmatch(r"c(\d+)", node.attr)
            return _Const(int(match.group(1))) if match else None
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Call):
            args = [self._eval(a) for a in node.args]
            kwargs = {kw.arg: self._eval(kw.value) for kw in node.keywords}
            return self._call(_call_name(node.func), args, kwargs)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._eval(child)
        return None

    def _call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        namespace, _, op = name.rpartition(".")
        if namespace not in ("torch", "ops.aten"):
            return None

        def arg(position: int, keyword: str) -> Any:
            return args[position] if len(args) > position else kwargs.get(keyword)

        if op == "embedding" and isinstance(weight := arg(0, "weight"), _Const):
            self.events.append(_Embedding(weight.index, arg(1, "indices")))
        elif (op == "layer_norm" and isinstance(weight := arg(2, "weight"), _Const)
              and isinstance(bias := arg(3, "bias"), _Const)):
            self.events.append(_LayerNorm(weight.index, bias.index))
        elif op == "linear" and isinstance(weight := arg(1, "weight"), _Const) and not weight.transposed:
            bias = arg(2, "bias")
            return self._linear(weight, bias.index if isinstance(bias, _Const) else None)
        elif op == "matmul" and isinstance(weight := arg(1, "other"), _Const):
            # x @ W: W is stored [in, out] (pre-transposed) unless it is t() of an [out, in] constant
            return self._linear(_Const(weight.index, not weight.transposed), None)
        elif (op == "addmm" and isinstance(bias := arg(0, "self"), _Const)
              and isinstance(weight := arg(2, "mat2"), _Const)):
            return self._linear(_Const(weight.index, not weight.transposed), bias.index)
        elif op in ("t", "transpose") and isinstance(weight := arg(0, "self"), _Const):
            return _Const(weight.index, not weight.transposed)
        elif (op in ("add", "add_") and isinstance(output := arg(0, "self"), _LinearOutput)
              and isinstance(bias := arg(1, "other"), _Const) and output.linear.bias is None):
            output.linear.bias = bias.index  # the bias of a linear split into matmul + add
            return output
        return None

    def _linear(self, weight: _Const, bias: int | None) -> _LinearOutput:
        linear = _Linear(weight, bias)
        self.events.append(linear)
        return _LinearOutput(linear)


# ---- weights in BertForMaskedLM names -------------------------------------------------------------

_EMBEDDING_ROLES = {0: "word_embeddings", 2: "token_type_embeddings", 3: "position_embeddings"}


@dataclass
class _BertWeights:
    tensors: dict[str, torch.Tensor]
    num_layers: int
    layout: str  # "frozen" or "named"


def _named_bert_weights(archive: TorchScriptArchive) -> _BertWeights | None:
    """A traced but not frozen archive: weights are module attributes under the HF names, possibly
    below a wrapper's prefix."""
    tensors = dict(named_tensors(archive.root))
    anchor = "bert.embeddings.word_embeddings.weight"
    prefixes = [name[: -len(anchor)] for name in tensors if name.endswith(anchor)]
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise ElandArchiveError(f"{archive.path} holds more than one BERT model (under {', '.join(prefixes)})")
    prefix = prefixes[0]
    ours = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    if "cls.predictions.bias" not in ours and "cls.predictions.decoder.bias" in ours:
        ours["cls.predictions.bias"] = ours["cls.predictions.decoder.bias"]
    ours.pop("cls.predictions.decoder.bias", None)
    layers = {int(m.group(1)) for name in ours if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", name))}
    if not layers:
        raise ElandArchiveError(f"{archive.path} has BERT embeddings but no encoder layers")
    num_layers = max(layers) + 1
    wanted = bert_mlm_names(num_layers)
    missing = [name for name in wanted if name not in ours]
    if missing:
        raise ElandArchiveError(
            f"{archive.path} is not a BERT masked-LM (text_expansion) model: missing {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    kept = {name: ours[name] for name in wanted}
    if "cls.predictions.decoder.weight" in ours:
        kept["cls.predictions.decoder.weight"] = ours["cls.predictions.decoder.weight"]
    return _BertWeights(kept, num_layers, "named")


def bert_mlm_names(num_layers: int) -> list[str]:
    """What the BERT family reads of a ``BertForMaskedLM`` with ``num_layers`` layers (its head's
    names as bert.py declares them)."""
    names = [
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
    ]
    for i in range(num_layers):
        layer = f"bert.encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                     "output.dense", "output.LayerNorm"):
            names += [layer + part + ".weight", layer + part + ".bias"]
    return names + list(MLM_HEAD_WEIGHTS)


def _frozen_bert_weights(archive: TorchScriptArchive, trees: dict[str, ast.Module]) -> _BertWeights:
    """A frozen archive: weights are anonymous constants. Their roles follow from the op sequence of
    BERT's forward: three embedding lookups, LayerNorm; per layer the attention's linears (q, k, v,
    output; or q|k|v fused, then output, which freezing's concat-linear pass does to CUDA weights) and
    LayerNorm, the feed-forward's two linears and LayerNorm; the MLM head's dense and LayerNorm, then
    the decoder. A linear may be ``linear``, ``addmm`` or the pre-transposed ``matmul`` + ``add`` of
    ``torch.jit.optimize_for_inference``."""
    qualified_name = getattr(archive.root, "qualified_name", "")
    forward = _find_forward(trees, qualified_name) if qualified_name else None
    if forward is None:
        raise ElandArchiveError(f"{archive.path}: no source for {qualified_name or 'the top module'}.forward")
    events = _ForwardReader(forward).events
    constants = archive.constants

    def const(index: int) -> torch.Tensor:
        if not 0 <= index < len(constants) or not isinstance(constants[index], torch.Tensor):
            raise ElandArchiveError(f"{archive.path}: CONSTANTS.c{index} is not a tensor in constants.pkl")
        return constants[index]

    def weight(linear: _Linear) -> torch.Tensor:
        tensor = const(linear.weight.index)
        if tensor.dim() != 2:
            raise ElandArchiveError(f"{archive.path}: a linear weight (CONSTANTS.c{linear.weight.index}) is not 2-D")
        return tensor.t() if linear.weight.transposed else tensor

    def bias(linear: _Linear) -> torch.Tensor:
        if linear.bias is None:
            raise ElandArchiveError(f"{archive.path}: a linear layer has no bias; BERT's all have one")
        return const(linear.bias)

    def not_bert(why: str) -> ElandArchiveError:
        return ElandArchiveError(f"{archive.path} is not laid out like a BERT masked-LM (text_expansion) model: {why}")

    norms = [i for i, e in enumerate(events) if isinstance(e, _LayerNorm)]
    if len(norms) < 4 or len(norms) % 2:
        raise not_bert(f"found {len(norms)} LayerNorms, expected 2 per layer plus 2")
    num_layers = (len(norms) - 2) // 2
    embeddings = [e for e in events[: norms[0]] if isinstance(e, _Embedding)]
    if len(embeddings) != 3:
        raise not_bert(f"found {len(embeddings)} embedding lookups before the first LayerNorm, expected 3")
    tensors: dict[str, torch.Tensor] = {}
    roles = {_EMBEDDING_ROLES.get(e.indices.position) for e in embeddings if isinstance(e.indices, _Input)}
    if roles == set(_EMBEDDING_ROLES.values()):
        for e in embeddings:
            tensors[f"bert.embeddings.{_EMBEDDING_ROLES[e.indices.position]}.weight"] = const(e.weight)
    else:  # indices computed inside the graph: word has the most rows, token types the fewest
        by_rows = sorted((const(e.weight) for e in embeddings), key=lambda t: t.shape[0])
        for role, tensor in zip(("token_type_embeddings", "position_embeddings", "word_embeddings"), by_rows):
            tensors[f"bert.embeddings.{role}.weight"] = tensor

    def norm(position: int, name: str) -> None:
        event = events[norms[position]]
        tensors[name + ".weight"], tensors[name + ".bias"] = const(event.weight), const(event.bias)

    def linears_after(position: int) -> list[_Linear]:
        """The linear layers between LayerNorm number ``position`` and the next one (or the end)."""
        stop = norms[position + 1] if position + 1 < len(norms) else None
        return [e for e in events[norms[position] + 1: stop] if isinstance(e, _Linear)]

    def dense(linear: _Linear, name: str) -> None:
        tensors[name + ".weight"], tensors[name + ".bias"] = weight(linear), bias(linear)

    norm(0, "bert.embeddings.LayerNorm")
    for i in range(num_layers):
        layer = f"bert.encoder.layer.{i}."
        attention = linears_after(2 * i)
        if len(attention) == 4:
            for linear, part in zip(attention, ("query", "key", "value")):
                dense(linear, layer + "attention.self." + part)
        elif len(attention) == 2 and weight(attention[0]).shape[0] == 3 * weight(attention[1]).shape[0]:
            qkv_weight, qkv_bias = weight(attention[0]).chunk(3, dim=0), bias(attention[0]).chunk(3, dim=0)
            for part, w, b in zip(("query", "key", "value"), qkv_weight, qkv_bias):
                tensors[layer + f"attention.self.{part}.weight"], tensors[layer + f"attention.self.{part}.bias"] = w, b
        else:
            raise not_bert(f"layer {i}'s attention has {len(attention)} linear layers, expected q, k, v and output")
        dense(attention[-1], layer + "attention.output.dense")
        norm(2 * i + 1, layer + "attention.output.LayerNorm")
        feed_forward = linears_after(2 * i + 1)
        if len(feed_forward) != 2:
            raise not_bert(f"layer {i}'s feed-forward has {len(feed_forward)} linear layers, expected 2")
        dense(feed_forward[0], layer + "intermediate.dense")
        dense(feed_forward[1], layer + "output.dense")
        norm(2 * i + 2, layer + "output.LayerNorm")
    transform = linears_after(2 * num_layers)
    decoder = linears_after(2 * num_layers + 1)
    if len(transform) != 1 or not decoder:
        raise not_bert("no masked-LM head (dense, LayerNorm, decoder) after the encoder")
    dense(transform[0], "cls.predictions.transform.dense")
    norm(2 * num_layers + 1, "cls.predictions.transform.LayerNorm")
    tensors["cls.predictions.decoder.weight"] = weight(decoder[0])
    tensors["cls.predictions.bias"] = bias(decoder[0])
    return _BertWeights(tensors, num_layers, "frozen")


def _check_shapes(tensors: dict[str, torch.Tensor], num_layers: int, path: Path) -> tuple[int, int, int]:
    """(vocab, hidden, intermediate), after checking every weight against them and every bias against
    its weight: a constant mapped to the wrong role almost always has the wrong shape."""
    vocab, hidden = tensors["bert.embeddings.word_embeddings.weight"].shape
    intermediate = tensors["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    expected = {"cls.predictions.bias": (vocab,), "cls.predictions.decoder.weight": (vocab, hidden),
                "cls.predictions.transform.dense.weight": (hidden, hidden)}
    for i in range(num_layers):
        layer = f"bert.encoder.layer.{i}."
        for part in ("self.query", "self.key", "self.value", "output.dense"):
            expected[f"{layer}attention.{part}.weight"] = (hidden, hidden)
        expected[layer + "intermediate.dense.weight"] = (intermediate, hidden)
        expected[layer + "output.dense.weight"] = (hidden, intermediate)
    for name, tensor in tensors.items():
        if name.endswith("embeddings.weight"):
            shape = (tensor.shape[0], hidden)
        elif ".LayerNorm." in name:
            shape = (hidden,)
        elif name.endswith(".bias") and name[: -len("bias")] + "weight" in tensors:
            shape = (tensors[name[: -len("bias")] + "weight"].shape[0],)
        else:
            shape = expected.get(name, tuple(tensor.shape))
        if tuple(tensor.shape) != shape:
            raise ElandArchiveError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return vocab, hidden, intermediate


# ---- vocabulary, metadata, tokenizer ----------------------------------------------------------------

@dataclass(frozen=True)
class ElandTokenization:
    do_lower_case: bool
    max_sequence_length: int


def read_eland_metadata(path: Path) -> ElandTokenization:
    """The tokenization settings of ``NAME.metadata.json`` (Elasticsearch's model-package config or
    the trained-model config eland uploads; both carry ``inference_config``)."""
    data = _read_json(path)
    inference_config = data.get("inference_config") if isinstance(data, dict) else None
    if not isinstance(inference_config, dict) or not inference_config:
        raise ElandArchiveError(f"{path} has no inference_config")
    if "text_expansion" not in inference_config:
        raise ElandArchiveError(
            f"{path} describes a {', '.join(inference_config)} model; only text_expansion (ELSER-style sparse) "
            "archives are supported"
        )
    options = inference_config["text_expansion"] or {}
    tokenization = options.get("tokenization") or {"bert": {}}
    if not isinstance(tokenization, dict) or set(tokenization) != {"bert"}:
        kinds = ", ".join(tokenization) if isinstance(tokenization, dict) else repr(tokenization)
        raise ElandArchiveError(f"{path}: tokenization {kinds} is not supported; only bert (WordPiece) is")
    bert = tokenization["bert"] or {}
    if bert.get("with_special_tokens", True) is False:
        raise ElandArchiveError(f"{path}: with_special_tokens false is not supported")
    max_length = bert.get("max_sequence_length", ES_DEFAULT_MAX_SEQUENCE_LENGTH)
    if not isinstance(max_length, int) or max_length < 3:
        raise ElandArchiveError(f"{path}: max_sequence_length {max_length!r} is not a usable token count")
    return ElandTokenization(bool(bert.get("do_lower_case", ES_DEFAULT_DO_LOWER_CASE)), max_length)


def read_eland_vocabulary(path: Path) -> list[str]:
    data = _read_json(path)
    vocab = data.get("vocabulary") if isinstance(data, dict) else None
    if not isinstance(vocab, list) or not vocab or not all(isinstance(t, str) for t in vocab):
        raise ElandArchiveError(f"{path} has no \"vocabulary\" list of token strings")
    duplicates = [t for t, n in collections.Counter(vocab).items() if n > 1]
    if duplicates:
        raise ElandArchiveError(f"{path} lists some tokens twice ({', '.join(duplicates[:5])})")
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ElandArchiveError(f"{path} is not a BERT WordPiece vocabulary: {', '.join(missing)} missing")
    return vocab


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ElandArchiveError(f"{path} is not readable JSON ({exc})") from None


def wordpiece_tokenizer(vocab: list[str], do_lower_case: bool):
    """A ``tokenizers.Tokenizer`` equivalent to ``BertTokenizerFast(vocab_file, do_lower_case=...)``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix="##",
                                           max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case,
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t in ids])
    return tokenizer


# ---- conversion -------------------------------------------------------------------------------------

@dataclass
class ConvertedModel:
    """An eland archive in HF ``BertForMaskedLM`` form, ready to be written as a model directory."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict[str, Any]
    settings: dict[str, Any]
    layout: str     # "frozen" (weights from constants.pkl) or "named" (module attributes)


def convert_eland_archive(files: ElandFiles, num_attention_heads: int | None = None) -> ConvertedModel:
    """Read the three files into HF names and config. ``num_attention_heads`` is needed only when the
    archive's source does not show the head size; when both exist they must agree."""
    tokenization = read_eland_metadata(files.metadata)
    vocab = read_eland_vocabulary(files.vocab)
    archive = read_torchscript_archive(files.pt)
    trees = _parse_code(archive)
    bert = _named_bert_weights(archive) or _frozen_bert_weights(archive, trees)
    tensors = bert.tensors
    vocab_size, hidden, intermediate = _check_shapes(tensors, bert.num_layers, files.pt)
    if len(vocab) > vocab_size:
        raise ElandArchiveError(f"{files.vocab} lists {len(vocab)} tokens; the model has only {vocab_size}")

    facts = scan_code_facts(trees, hidden)
    heads = _attention_heads(facts, hidden, num_attention_heads, files.pt)
    eps = facts.layer_norm_eps.most_common(1)[0][0] if facts.layer_norm_eps else 1e-12
    if not facts.gelu_approximate:
        raise ElandArchiveError(f"{files.pt}: no GELU in the archive's source; only GELU BERT models are supported")
    approximate = facts.gelu_approximate.most_common(1)[0][0]
    hidden_act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(approximate)
    if hidden_act is None:
        raise ElandArchiveError(f"{files.pt}: GELU with approximate={approximate!r} is not supported")

    decoder = tensors.get("cls.predictions.decoder.weight")
    tied = decoder is None or torch.equal(decoder, tensors["bert.embeddings.word_embeddings.weight"])
    if tied:
        tensors.pop("cls.predictions.decoder.weight", None)
    # transformers 4 shares this with cls.predictions.bias; 5 ties it only with tie_word_embeddings
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
    dtype = tensors["bert.embeddings.word_embeddings.weight"].dtype
    pad_id = vocab.index("[PAD]") if "[PAD]" in vocab else 0
    max_positions = tensors["bert.embeddings.position_embeddings.weight"].shape[0]
    config = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": bert.num_layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "hidden_act": hidden_act,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": max_positions,
        "type_vocab_size": tensors["bert.embeddings.token_type_embeddings.weight"].shape[0],
        "initializer_range": 0.02,
        "layer_norm_eps": eps,
        "pad_token_id": pad_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": tied,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    max_tokens = min(tokenization.max_sequence_length, max_positions)
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": tokenization.do_lower_case,
        "model_max_length": max_tokens,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "tokenize_chinese_chars": True,
        "strip_accents": None,
    }
    settings = {"task": "sparse_embedding", "max_input_tokens": max_tokens}
    return ConvertedModel(tensors, config, wordpiece_tokenizer(vocab, tokenization.do_lower_case),
                          tokenizer_config, settings, bert.layout)


def _attention_heads(facts: CodeFacts, hidden: int, explicit: int | None, path: Path) -> int:
    derived = None
    if facts.head_sizes:
        head_size = facts.head_sizes.most_common(1)[0][0]
        derived = hidden // head_size
    if explicit is not None:
        if explicit < 1 or hidden % explicit:
            raise ElandArchiveError(f"num_attention_heads {explicit} does not divide the hidden size {hidden}")
        if derived is not None and derived != explicit:
            raise ElandArchiveError(
                f"num_attention_heads {explicit} was given but {path}'s attention splits {hidden} into {derived} heads"
            )
        return explicit
    if derived is None:
        raise ElandArchiveError(
            f"{path}: the attention head count is not visible in the archive's source; "
            "pass it explicitly (--num-attention-heads)"
        )
    return derived


def write_model_dir(model: ConvertedModel, dest: Path) -> list[Path]:
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    weights, storages = {}, set()
    for name, tensor in model.weights.items():
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        weights[name] = tensor
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(model.tokenizer_config, indent=2) + "\n")
    (dest / "infercore.json").write_text(json.dumps(model.settings, indent=2) + "\n")
    return [dest / name for name in MODEL_DIR_FILES]


def not_an_archive_message(src: str | Path) -> str:
    """Why ``src`` is not an eland archive, naming the companion file that is missing if that is why."""
    src = Path(src)
    expected = "expected NAME.pt with NAME.vocab.json and NAME.metadata.json beside it"
    pts = [p for p in src.glob("*.pt") if p.is_file()] if src.is_dir() else [src] if src.suffix == ".pt" else []
    if len(pts) > 1:
        return f"{src} holds {len(pts)} .pt files; give the path of the one to import"
    if len(pts) == 1 and pts[0].is_file():
        pt = pts[0]
        missing = [n for n in (pt.stem + ".vocab.json", pt.stem + ".metadata.json") if not (pt.parent / n).is_file()]
        return f"{src} is not an eland archive: {', '.join(missing)} missing beside {pt.name}"
    return f"{src} is not an eland archive ({expected}, or the directory holding them)"


def import_eland_archive(src: str | Path, dest: str | Path, *, overwrite: bool = False,
                         num_attention_heads: int | None = None) -> Path:
    """Convert the archive at ``src`` into a model directory ``dest`` (config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json, infercore.json). A non-empty ``dest``
    is refused unless ``overwrite``; then those five files are replaced and nothing else is touched."""
    files = find_eland_archive(src)
    if files is None:
        raise ElandArchiveError(not_an_archive_message(src))
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ElandArchiveError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ElandArchiveError(f"{dest} is not empty; choose a new directory or allow overwriting")
    model = convert_eland_archive(files, num_attention_heads)
    write_model_dir(model, dest)
    log.info("imported eland archive %s (%s layout, %d layers) into %s",
             files.pt, model.layout, model.config["num_hidden_layers"], dest)
    return dest


def eland_cache_root() -> Path:
    base = os.environ.get(CACHE_DIR_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "infercore") / "eland"


def _fingerprint(files: ElandFiles) -> str:
    digest = hashlib.sha256()
    for path in (files.pt, files.vocab, files.metadata):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def materialize_eland(path: str | Path) -> Path | None:
    """For loading an archive directly: the converted model directory in the cache (made on first
    use, reused while the three files keep their sizes and mtimes); None when ``path`` is not an
    eland archive."""
    files = find_eland_archive(path)
    if files is None:
        return None
    target = eland_cache_root() / f"{files.stem}-{_fingerprint(files)}"
    if (target / "infercore.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        import_eland_archive(files.pt, staging)
        try:
            staging.rename(target)  # atomic: a reader never sees half a directory
        except OSError:
            if not (target / "infercore.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
