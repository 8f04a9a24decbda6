"""Hugging Face encoders with task heads, in their default configs (``return_dict=True``): DeBERTa-v2's
disentangled relative-position attention prunes its heads (the shared position keys are tiled over the batch with
``repeat``), and the written-back classifier round-trips through ``save_pretrained``/``from_pretrained``; task
models (``BertForSequenceClassification.bert``) get their layer widths written to the config."""

from __future__ import annotations

import warnings

import pytest
import torch

import graphopt

transformers = pytest.importorskip("transformers")

_DEBERTA_V3 = dict(  # deberta-v3-base's attention settings at toy sizes
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
    max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, num_labels=3)


def _inputs(batch: int = 2) -> dict:
    ids = torch.randint(1, 128, (batch, 12), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _classifier(kind: str, **kwargs):
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(**kwargs)
    return getattr(transformers, f"{kind}ForSequenceClassification")(config).eval()


@pytest.fixture(scope="module")
def deberta():
    model = _classifier("DebertaV2", **_DEBERTA_V3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphopt.GraphoptWarning)
        res = graphopt.optimize(model, "prune-channels:ratio=0.5", _inputs())
        pruned = res.to_model()
    return model, res, pruned, [str(w.message) for w in caught if issubclass(w.category, graphopt.GraphoptWarning)]


def test_deberta_relative_attention_loses_heads_without_frozen_channels(deberta):
    model, res, pruned, notes = deberta
    assert not notes, notes  # no frozen-channel warning (repeat has a rule) and the config describes the result
    attn = pruned.deberta.encoder.layer[0].attention.self
    assert pruned.config.num_attention_heads == attn.num_attention_heads < 4
    assert attn.query_proj.out_features == pruned.config.num_attention_heads * pruned.config.attention_head_size
    assert pruned.config.intermediate_size == pruned.deberta.encoder.layer[0].intermediate.dense.out_features < 128
    assert graphopt.count_params(pruned) < 0.4 * graphopt.count_params(model)
    assert model.config.num_attention_heads == 4 and model.config.hidden_size == 64  # the caller's model untouched


def test_deberta_written_back_matches_the_graph_and_keeps_only_model_state(deberta):
    model, res, pruned, _ = deberta
    assert type(pruned) is type(model)
    assert set(pruned.state_dict()) <= set(model.state_dict())  # torch.export's lifted constants stay in the graph
    for batch in (2, 5):
        with torch.no_grad():
            torch.testing.assert_close(pruned(**_inputs(batch)).logits, res.module(**_inputs(batch)).logits,
                                       rtol=1e-5, atol=1e-5)


def test_deberta_saves_and_reloads_from_its_config_alone(deberta, tmp_path):
    _, _, pruned, _ = deberta
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    with torch.no_grad():
        assert torch.equal(reloaded(**_inputs()).logits, pruned(**_inputs()).logits)


def test_deberta_trains_after_write_back(deberta):
    _, _, pruned, _ = deberta
    model = pruned.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.tensor([0, 2])
    first = model(**_inputs(), labels=labels).loss
    for _ in range(5):
        opt.zero_grad()
        loss = model(**_inputs(), labels=labels).loss
        loss.backward()
        opt.step()
    assert loss.item() < first.item()
    pruned.eval()


def test_task_models_get_their_layer_widths_written_to_the_config():
    model = _classifier("Bert", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    res = graphopt.optimize(model, "prune-channels:ratio=0.5,ignore=[bert.embeddings.*]", _inputs())
    pruned = res.to_model()
    assert pruned.config.intermediate_size == pruned.bert.encoder.layer[0].intermediate.dense.out_features < 128
