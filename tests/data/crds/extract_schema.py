"""Cut a CustomResourceDefinition down to the part the manifest tests validate against: the
``openAPIV3Schema`` of one served version, without its ``description`` texts (most of a CRD's bytes),
with every sub-schema of 500+ characters that occurs more than once (KServe repeats the whole pod spec per
component) stored once under ``$defs`` and referred to by ``$ref``: the same schema, a tenth of the size.

    git show v0.20.0:config/crd/full/serving.kserve.io_servingruntimes.yaml \
        | python tests/data/crds/extract_schema.py v1alpha1 > tests/data/crds/servingruntime.v1alpha1.json

The output is a JSON object: the CRD's group, kind and version beside the schema. SOURCES.md in this
folder records which repository, tag and file each committed schema came from.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def without_descriptions(node: Any) -> Any:
    """The schema with every ``description`` string removed; a property *named* ``description`` (a
    schema object, not a string) is kept."""
    if isinstance(node, dict):
        return {
            key: without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


# Sub-schemas shorter than this (in canonical JSON characters) stay inline even when repeated.
SHARED_MIN_CHARS = 500


def canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


# Keywords whose value is one schema, a list of schemas, or a name → schema mapping. Everything else
# (enum, default, required, x-kubernetes-*) is data, never shared.
SCHEMA_KEYWORDS = ("items", "additionalProperties", "not")
SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf")
SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties")


def sub_schemas(schema: dict):
    """(keyword, name or index or None, sub-schema) for every schema directly inside ``schema``."""
    for keyword, value in schema.items():
        if keyword in SCHEMA_KEYWORDS and isinstance(value, dict):
            yield keyword, None, value
        elif keyword in SCHEMA_LIST_KEYWORDS:
            for index, item in enumerate(value):
                yield keyword, index, item
        elif keyword in SCHEMA_MAP_KEYWORDS:
            for name, item in value.items():
                yield keyword, name, item


def share_repeats(schema: dict) -> dict:
    """``schema`` with each repeated large sub-schema moved to ``$defs`` (JSON Schema 2020-12 refs)."""
    counts: dict[str, int] = {}

    def count(node: dict) -> None:
        key = canonical(node)
        counts[key] = counts.get(key, 0) + 1
        for _, _, child in sub_schemas(node):
            count(child)

    count(schema)
    defs: dict[str, Any] = {}
    names: dict[str, str] = {}

    def rewrite_children(node: dict) -> dict:
        out = dict(node)
        for keyword, where, child in sub_schemas(node):
            if where is None:
                out[keyword] = rewrite(child)
            elif isinstance(where, int):
                out[keyword] = [*out[keyword]]
                out[keyword][where] = rewrite(child)
            else:
                out[keyword] = {**out[keyword], where: rewrite(child)}
        return out

    def rewrite(node: dict) -> dict:
        key = canonical(node)
        if counts[key] > 1 and len(key) >= SHARED_MIN_CHARS:
            if key not in names:
                names[key] = f"shared{len(names)}"
                defs[names[key]] = rewrite_children(node)
            return {"$ref": f"#/$defs/{names[key]}"}
        return rewrite_children(node)

    shared = rewrite_children(schema)
    if defs:
        shared["$defs"] = defs
    return shared


def extract(crd: dict, version: str) -> dict:
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return {
                "group": crd["spec"]["group"],
                "kind": crd["spec"]["names"]["kind"],
                "version": version,
                "openAPIV3Schema": share_repeats(without_descriptions(served["schema"]["openAPIV3Schema"])),
            }
    raise SystemExit(f"version {version} not in the CRD (it has {[v['name'] for v in crd['spec']['versions']]})")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    crd = yaml.safe_load(sys.stdin)
    json.dump(extract(crd, sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
