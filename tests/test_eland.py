"""Elastic's eland / ELSER TorchScript archives (``NAME.pt`` + ``NAME.vocab.json`` +
``NAME.metadata.json``) read without running them, and converted into ordinary model directories.

The archives are tiny random BERT masked-LMs traced the way eland traces them (tests/eland_fixture.py);
the reference outputs come from the transformers model they were traced from. ``torch.jit.load`` runs
here only to check that the fixture archives compute what they claim; product code never calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from infercore.models import eland
from infercore.server import cli
from tests.eland_fixture import TinyElser, build_tiny_elser, vocabulary

# name → build_tiny_elser options. "eland" is the pipeline eland runs for text_expansion.
VARIANTS: dict[str, dict] = {
    "eland": dict(),
    "eland-4heads-cased-untied-sdpa": dict(num_heads=4, do_lower_case=False, tied_decoder=False,
                                           attn_implementation="sdpa", seed=1),
    "pooled": dict(pooled=True, seed=2),
    "optimized": dict(layout="optimized", seed=3),
    "traced": dict(layout="traced", seed=4),
    "pooled-traced-4heads": dict(layout="traced", pooled=True, num_heads=4, seed=5),
}
SENTENCES = [
    "Hello World! The quick brown fox jumps over the lazy dog.",
    "ELASTICSEARCH indexes sparse vectors, quickly?",
    "Café in New York (unknownword) -- re-running",
    "[MASK] is a token",
    "  tabs\tand\nnewlines  東京 search",
]


@pytest.fixture(scope="module")
def tiny_elser(tmp_path_factory):
    """Builds each variant once per module, on first use."""
    built: dict[str, TinyElser] = {}

    def get(variant: str) -> TinyElser:
        if variant not in built:
            built[variant] = build_tiny_elser(tmp_path_factory.mktemp(variant), **VARIANTS[variant])
        return built[variant]

    return get


def hf_inputs(texts: list[str], tokenizer) -> tuple[torch.Tensor, ...]:
    """A padded batch in the four-tensor form ml-cpp feeds eland's archives."""
    encodings = [tokenizer.encode(t) for t in texts]
    width = max(len(e.ids) for e in encodings)
    input_ids = torch.zeros(len(texts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
        attention_mask[row, : len(encoding.ids)] = 1
    return input_ids, attention_mask, torch.zeros_like(input_ids), torch.arange(width)


def splade_pool(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1)
    return weights.max(dim=1).values


# ---- the layout --------------------------------------------------------------------------------

def test_find_eland_archive_accepts_the_directory_or_the_pt_and_nothing_else(tiny_elser, tmp_path):
    archive = tiny_elser("eland")
    expected = eland.ElandFiles(archive.pt, archive.vocab_json, archive.metadata_json)
    assert eland.find_eland_archive(archive.directory) == expected
    assert eland.find_eland_archive(archive.pt) == expected
    assert eland.find_eland_archive(archive.vocab_json) is None
    assert eland.find_eland_archive(tmp_path / "missing") is None

    no_metadata = tmp_path / "no-metadata"
    no_metadata.mkdir()
    shutil.copy(archive.pt, no_metadata)
    shutil.copy(archive.vocab_json, no_metadata)
    assert eland.find_eland_archive(no_metadata) is None
    assert eland.find_eland_archive(no_metadata / archive.pt.name) is None

    two_archives = tmp_path / "two"
    shutil.copytree(archive.directory, two_archives)
    shutil.copy(archive.pt, two_archives / "other.pt")
    assert eland.find_eland_archive(two_archives) is None


# ---- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_read_back_equal_the_traced_model_tensor_for_tensor(tiny_elser, variant):
    archive = tiny_elser(variant)
    converted = eland.convert_eland_archive(eland.find_eland_archive(archive.pt))
    original = archive.model.state_dict()
    expected_names = set(eland.bert_mlm_names(2))
    assert expected_names <= set(converted.weights)
    for name, tensor in converted.weights.items():
        assert torch.equal(tensor, original[name]), name
    decoder = original["cls.predictions.decoder.weight"]
    if torch.equal(decoder, original["bert.embeddings.word_embeddings.weight"]):
        assert "cls.predictions.decoder.weight" not in converted.weights
        assert converted.config["tie_word_embeddings"] is True
    else:
        assert torch.equal(converted.weights["cls.predictions.decoder.weight"], decoder)
        assert converted.config["tie_word_embeddings"] is False
    expected_layout = "named" if VARIANTS[variant].get("layout") == "traced" else "frozen"
    assert converted.layout == expected_layout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_is_derived_from_the_archive_including_the_head_count(tiny_elser, variant):
    archive = tiny_elser(variant)
    config = eland.convert_eland_archive(eland.find_eland_archive(archive.pt)).config
    hf = archive.model.config
    assert config["num_attention_heads"] == VARIANTS[variant].get("num_heads", 2)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id"):
        assert config[key] == getattr(hf, key), key
    assert config["architectures"] == ["BertForMaskedLM"]
    assert config["model_type"] == "bert"


def test_a_given_head_count_must_agree_with_the_archive(tiny_elser):
    files = eland.find_eland_archive(tiny_elser("eland").pt)
    assert eland.convert_eland_archive(files, num_attention_heads=2).config["num_attention_heads"] == 2
    with pytest.raises(eland.ElandArchiveError, match="splits 32 into 2 heads"):
        eland.convert_eland_archive(files, num_attention_heads=4)


# ---- never running the archive --------------------------------------------------------------------

def test_import_never_loads_torchscript_or_pickles_through_torch(tiny_elser, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the archive was handed to torch's loader")

    for target, name in [(torch.jit, "load"), (torch, "load"), (torch.serialization, "load"),
                         (torch._C, "import_ir_module"), (torch._C, "import_ir_module_from_buffer")]:
        monkeypatch.setattr(target, name, refuse)
    for variant in ("eland", "traced"):
        dest = eland.import_eland_archive(tiny_elser(variant).pt, tmp_path / variant)
        assert (dest / "model.safetensors").is_file()


def handmade_pickle(module: str, name: str, argument: str) -> bytes:
    """Protocol-2 pickle bytes for ``module.name(argument)``: GLOBAL, MARK, BINUNICODE, TUPLE, REDUCE, STOP."""
    text = argument.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(X" + len(text).to_bytes(4, "little") + text
            + b"tR.")


def archive_with_entry_replaced(source: Path, dest: Path, entry: str, data: bytes) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            out.writestr(info, data if info.filename.endswith("/" + entry) else src.read(info))
    return dest


@pytest.mark.parametrize("entry", ["data.pkl", "constants.pkl"])
@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("builtins", "eval"), ("posix", "system")])
def test_a_pickle_naming_a_forbidden_global_is_refused_without_running_it(tiny_elser, tmp_path, entry, module, name):
    marker = tmp_path / "it-ran"
    argument = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w').close()"
    source = tiny_elser("eland")
    layout = tmp_path / "bad"
    layout.mkdir()
    archive_with_entry_replaced(source.pt, layout / "tiny_elser.pt", entry, handmade_pickle(module, name, argument))
    shutil.copy(source.vocab_json, layout)
    shutil.copy(source.metadata_json, layout)
    with pytest.raises(eland.ElandArchiveError, match=rf"global {module}\.{name}\b"):
        eland.import_eland_archive(layout, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_quantized_archive_is_refused_with_a_plain_reason(tiny_elser, tmp_path):
    source = tiny_elser("eland")
    bad = archive_with_entry_replaced(source.pt, tmp_path / "q.pt", "constants.pkl",
                                      handmade_pickle("torch._utils", "_rebuild_qtensor", "x"))
    with pytest.raises(eland.ElandArchiveError, match="quantized"):
        eland.read_torchscript_archive(bad)


def test_a_file_that_is_not_a_torchscript_zip_is_refused(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(eland.ElandArchiveError, match="not a TorchScript archive"):
        eland.read_torchscript_archive(bogus)


# ---- metadata and tokenizer ----------------------------------------------------------------------

@pytest.mark.parametrize("do_lower_case", [True, False], ids=["uncased", "cased"])
def test_tokenizer_json_tokenizes_like_bert_tokenizer_fast(tmp_path, do_lower_case):
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    vocab = vocabulary()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    reference = BertTokenizerFast.from_pretrained(tmp_path, do_lower_case=do_lower_case)
    eland.wordpiece_tokenizer(vocab, do_lower_case).save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    unknowns = 0
    for text in SENTENCES:
        expected = reference(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        unknowns += expected.count(vocab.index("[UNK]"))
    assert unknowns >= 3  # words outside the vocabulary take the [UNK] path
    pair = reference(SENTENCES[0], SENTENCES[1])
    encoding = ours.encode(SENTENCES[0], SENTENCES[1])
    assert (encoding.ids, encoding.type_ids) == (pair["input_ids"], pair["token_type_ids"])


def test_lower_casing_follows_the_metadata(tiny_elser, tmp_path):
    from tokenizers import Tokenizer

    for variant, lower in (("eland", True), ("eland-4heads-cased-untied-sdpa", False)):
        dest = eland.import_eland_archive(tiny_elser(variant).pt, tmp_path / variant)
        tokens = Tokenizer.from_file(str(dest / "tokenizer.json")).encode("Hello World").tokens
        assert tokens == (["[CLS]", "hello", "world", "[SEP]"] if lower else ["[CLS]", "Hello", "[UNK]", "[SEP]"])
        assert json.loads((dest / "tokenizer_config.json").read_text())["do_lower_case"] is lower


@pytest.mark.parametrize(("inference_config", "message"), [
    ({"fill_mask": {"tokenization": {"bert": {}}}}, "fill_mask model"),
    ({"text_expansion": {"tokenization": {"roberta": {}}}}, "roberta is not supported"),
    ({}, "no inference_config"),
])
def test_metadata_of_another_task_or_tokenizer_is_refused(tiny_elser, tmp_path, inference_config, message):
    source = tiny_elser("eland")
    layout = Path(shutil.copytree(source.directory, tmp_path / "layout"))
    metadata = layout / source.metadata_json.name
    metadata.write_text(json.dumps({"packaged_model_id": "x", "inference_config": inference_config}))
    with pytest.raises(eland.ElandArchiveError, match=message):
        eland.import_eland_archive(layout, tmp_path / "out")


# ---- the imported directory ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["eland", "eland-4heads-cased-untied-sdpa", "pooled-traced-4heads"])
def test_imported_directory_loads_in_transformers_with_identical_logits(tiny_elser, tmp_path, variant):
    from tokenizers import Tokenizer
    from transformers import BertForMaskedLM

    archive = tiny_elser(variant)
    dest = eland.import_eland_archive(archive.pt, tmp_path / "model")
    assert sorted(p.name for p in dest.iterdir()) == sorted(eland.MODEL_DIR_FILES)
    assert json.loads((dest / "infercore.json").read_text()) == {
        "task": "sparse_embedding", "max_input_tokens": archive.max_sequence_length,
    }
    assert json.loads((dest / "tokenizer_config.json").read_text())["model_max_length"] == archive.max_sequence_length

    attention = archive.model.config._attn_implementation
    loaded = BertForMaskedLM.from_pretrained(dest, attn_implementation=attention).eval()
    input_ids, attention_mask, token_type_ids, position_ids = hf_inputs(
        SENTENCES, Tokenizer.from_file(str(dest / "tokenizer.json")))
    with torch.no_grad():
        expected = archive.model(input_ids, attention_mask, token_type_ids, position_ids)[0]
        actual = loaded(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, return_dict=False)[0]
    assert torch.equal(actual, expected)


def test_imported_directory_passes_models_verify(tiny_elser, tmp_path):
    from infercore.models.verify import verify_model_dir

    dest = eland.import_eland_archive(tiny_elser("pooled").pt, tmp_path / "model")
    report = verify_model_dir(dest, load=True)
    assert report.ok, report.problem
    assert report.task == "sparse_embedding"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fixture_archive_computes_what_eland_or_elser_would(tiny_elser, variant):
    """The reference side: the traced archive (run by TorchScript, in this test only) equals the
    transformers model's logits (eland's raw MLM) or their SPLADE pooling (the ELSER-like wrapper)."""
    archive = tiny_elser(variant)
    inputs = hf_inputs(SENTENCES, eland.wordpiece_tokenizer(vocabulary(), archive.do_lower_case))
    traced = torch.jit.load(str(archive.pt))
    with torch.no_grad():
        output = traced(*inputs)
        logits = archive.model(*inputs)[0]
    if archive.pooled:
        torch.testing.assert_close(output, splade_pool(logits, inputs[1]))
        assert output.shape == (len(SENTENCES), len(vocabulary()))
    else:
        torch.testing.assert_close(output[0], logits)


def test_import_refuses_a_non_empty_destination_unless_asked(tiny_elser, tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(eland.ElandArchiveError, match="not empty"):
        eland.import_eland_archive(tiny_elser("eland").pt, dest)
    eland.import_eland_archive(tiny_elser("eland").pt, dest, overwrite=True)
    assert (dest / "model.safetensors").is_file()
    assert (dest / "notes.txt").read_text() == "mine"


# ---- materialize_eland (the loader's entry point) -------------------------------------------------

def test_materialize_converts_once_into_the_cache_and_reuses_it(tiny_elser, tmp_path, monkeypatch):
    monkeypatch.setenv(eland.CACHE_DIR_ENV, str(tmp_path / "cache"))
    source = Path(shutil.copytree(tiny_elser("eland").directory, tmp_path / "archive"))
    first = eland.materialize_eland(source)
    assert first is not None and first.parent == tmp_path / "cache" / "eland"
    assert first.name.startswith("tiny_elser-")
    assert sorted(p.name for p in first.iterdir()) == sorted(eland.MODEL_DIR_FILES)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging directory left behind

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(eland, "import_eland_archive", no_second_conversion)
        assert eland.materialize_eland(source / "tiny_elser.pt") == first

    pt = source / "tiny_elser.pt"
    stat = pt.stat()
    os.utime(pt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = eland.materialize_eland(source)
    assert second != first and second.is_dir()


def hf_model_dir(path: Path) -> Path:
    """Looks like a model directory, not like an eland archive."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_materialize_returns_none_for_anything_else(tmp_path, monkeypatch):
    monkeypatch.setenv(eland.CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert eland.materialize_eland(hf_model_dir(tmp_path / "hf")) is None
    assert eland.materialize_eland(tmp_path / "missing") is None
    assert not (tmp_path / "cache").exists()


# ---- CLI -----------------------------------------------------------------------------------------

def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models_import_writes_the_model_directory(tiny_elser, tmp_path, capsys):
    dest = tmp_path / "elser"
    code, out, err = run_main(capsys, "models", "import", str(tiny_elser("eland").directory), str(dest))
    assert code == 0, err
    for name in eland.MODEL_DIR_FILES:
        assert (dest / name).is_file()
        assert str(dest / name) in out

    code, out, err = run_main(capsys, "models", "import", str(tiny_elser("eland").pt), str(dest))
    assert code != 0 and "not empty" in err
    code, out, err = run_main(capsys, "models", "import", "--force", str(tiny_elser("eland").pt), str(dest))
    assert code == 0, err


def test_cli_models_import_refuses_what_is_not_an_archive(tiny_elser, tmp_path, capsys):
    code, _, err = run_main(capsys, "models", "import", str(hf_model_dir(tmp_path / "hf")), str(tmp_path / "out"))
    assert code != 0
    assert "is not an eland archive" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(tiny_elser("eland").pt, incomplete)
    shutil.copy(tiny_elser("eland").vocab_json, incomplete)
    code, _, err = run_main(capsys, "models", "import", str(incomplete), str(tmp_path / "out"))
    assert code != 0
    assert "tiny_elser.metadata.json missing beside tiny_elser.pt" in err


@pytest.mark.parametrize("variant", ["pooled", "eland"])
def test_an_archive_served_directly_gives_what_the_archive_computes(tiny_elser, variant, tmp_path, monkeypatch):
    """End to end: `--model elser=<archive dir>` → infercore's sparse vectors equal the SPLADE
    pooling the archive itself computes (run by TorchScript here, as the reference only)."""
    from infercore.models.loader import load_model
    from infercore.models.packing import pack_sequences
    from infercore.models.sparse import SparseOptions

    monkeypatch.setenv(eland.CACHE_DIR_ENV, str(tmp_path / "cache"))
    archive = tiny_elser(variant)
    model = load_model("elser", archive.directory, device="cpu")
    assert model.task == "sparse_embedding" and model.max_input_tokens == archive.max_sequence_length

    inputs = hf_inputs(SENTENCES, eland.wordpiece_tokenizer(vocabulary(), archive.do_lower_case))
    with torch.no_grad():
        output = torch.jit.load(str(archive.pt))(*inputs)
    expected = output if archive.pooled else splade_pool(output[0], inputs[1])

    tokenized = model.tokenizer.encode_batch(SENTENCES, truncate=True)
    assert [t.ids for t in tokenized] == [row[mask.bool()].tolist() for row, mask in zip(inputs[0], inputs[1])]
    batch = pack_sequences([t.ids for t in tokenized], [t.type_ids for t in tokenized])
    vectors = model.runner.run(batch, [SparseOptions()] * len(SENTENCES))
    for vector, row in zip(vectors, expected):
        ours = torch.zeros_like(row)
        ours[torch.as_tensor(vector.ids, dtype=torch.long)] = torch.as_tensor(vector.weights)
        assert set(vector.ids.tolist()) == set(torch.nonzero(row > 0).flatten().tolist())
        torch.testing.assert_close(ours, row, rtol=1e-4, atol=1e-5)
