"""The model contract (models/contract.py): every family's encoder and every task's runner is what
the protocols say, and the capability flags say what each one supports — the engine and the loader
read these flags instead of probing attributes or runner classes."""

from __future__ import annotations

import pytest

from infercore.models.contract import TASKS, Encoder, ListwiseRunner, Runner
from infercore.models.families import FAMILIES
from infercore.models.loader import load_model
from tests import tiny_checkpoints, tiny_jina, tiny_listwise, tiny_llama_like


def test_each_family_declares_the_tasks_its_heads_serve():
    tasks = {family.name: family.heads.tasks for family in FAMILIES}
    assert tasks == {
        "bert": TASKS,
        "jina-xlm-roberta": ("text_embedding", "rerank"),
        "xlm-roberta": ("text_embedding", "rerank"),
        "qwen3": ("text_embedding", "rerank"),
        "eurobert": ("text_embedding",),
        "jina-embeddings-v5": ("text_embedding",),
    }
    listwise = {family.name for family in FAMILIES if family.heads.listwise is not None}
    assert listwise == {"qwen3"}


BUILDS = {
    "bert sparse": (lambda p: tiny_checkpoints.build_bert_with_head(p, "BertForMaskedLM"),
                    "sparse_embedding", False, "bert", ()),
    "xlm-r cross-encoder": (tiny_checkpoints.build_xlmr_cross_encoder, "rerank", False, "xlm-roberta", ()),
    "jina-v3 embedding": (tiny_jina.build_jina_v3, "text_embedding", False, "jina-xlm-roberta",
                          tuple(tiny_jina.v3_config()["lora_adaptations"])),
    "qwen3 embedding": (tiny_llama_like.build_qwen3, "text_embedding", False, "qwen3", ()),
    "listwise reranker": (tiny_listwise.build_listwise, "rerank", True, "qwen3", ()),
}


@pytest.mark.parametrize("name", BUILDS)
def test_loaded_encoders_and_runners_follow_the_contract(tmp_path, name):
    build, task, listwise, family, adapters = BUILDS[name]
    served = load_model(name, build(tmp_path / "model"), device="cpu")
    runner = served.runner
    assert isinstance(runner, Runner) and isinstance(runner.encoder, Encoder)
    assert (runner.task, runner.listwise, served.family) == (task, listwise, family)
    assert isinstance(runner, ListwiseRunner) == listwise
    assert runner.encoder.adapter_names == adapters
    assert set(served.tasks) == set(adapters)  # every adapter is a task of the served model
    # The flags describe a runner that works: default options through one forward pass.
    assert len(served.run_ids([[1, 2, 3]])) == 1
