"""Checks behind ``infercore models list`` and ``infercore models verify``.

The quick check reads a directory's files (config, weight index, tokenizer, sentence-transformers
modules) without loading weights; the full check also loads the weights and runs a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .catalog import lookup, recognise
from .checkpoint import CheckpointError
from .eland import materialize_eland
from .families import family_for_config
from .loader import infer_task, load_model, require_served_task
from .model_dir import read_model_dir
from .tokenizer import TextTokenizer


@dataclass
class VerifyReport:
    path: Path
    model_id: str
    ok: bool = False
    task: str | None = None
    family: str | None = None
    facts: list[str] = field(default_factory=list)
    problem: str | None = None


def verify_model_dir(path: str | Path, model_id: str | None = None, load: bool = False) -> VerifyReport:
    path = Path(path).expanduser()
    report = VerifyReport(path=path, model_id=model_id or path.resolve().name)
    try:
        converted = materialize_eland(path)
        if converted is not None:
            report.facts.append(f"Elastic eland archive, read without running its code; converted into {converted}")
            path = converted
        spec = read_model_dir(path)
        report.facts.append(f"config: model_type {spec.model_type!r}, architectures {list(spec.architectures)}")
        report.facts.append(f"weights: {', '.join(f.name for f in spec.weight_files)}")
        family = family_for_config(spec.config)
        report.family = family.name
        entry = lookup(report.model_id) or lookup(spec.settings.get("catalog_id", "")) or recognise(
            spec.config, spec.path.name
        )
        if entry is not None and entry.id != report.model_id:
            report.facts.append(f"catalog: recognised as {entry.id}")
        report.task = infer_task(spec, entry)
        require_served_task(report.task, spec.path)
        tokenizer = TextTokenizer.from_file(spec.tokenizer_file, max_input_tokens=1 << 20)
        report.facts.append(f"tokenizer: {tokenizer.vocab_size} tokens")
        if spec.st_modules:
            report.facts.append(f"sentence-transformers modules: {', '.join(spec.st_modules)}")
        if spec.prompts:
            report.facts.append(f"prompts: {sorted(spec.prompts)} (default {spec.default_prompt_name!r})")
        if load:
            model = load_model(report.model_id, spec.path, device="cpu", dtype="float32")
            model.warmup()
            report.facts.append(
                f"loaded and ran a forward pass: {model.dimensions}-d {model.runner.pooling} pooling, "
                f"max {model.max_input_tokens} tokens"
            )
        report.ok = True
    except CheckpointError as exc:
        report.problem = str(exc)
    return report
