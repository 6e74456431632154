"""pipeline.contract's recall keys: per-field ``side``, list-valued fields (``list``), top-level ``recall``."""
from __future__ import annotations

import re
from typing import Any, Callable

import pytest
import yaml

from pipeline.contract import ContractError, ListSpec, Recall, load_contract, parse_contract
from tests.conftest import CONF

RECALL = CONF / "recall.yaml"


def recall_raw() -> dict[str, Any]:
    return yaml.safe_load(RECALL.read_text())


def cat(d: dict[str, Any], name: str) -> dict[str, Any]:
    return d["categorical"]["fields"][name]


def test_the_recall_layout_parses():
    c = load_contract(RECALL)
    assert c.recall == Recall(user_key="user_id", item_key="item_id", random_negatives=0)
    assert c.field("item_genres").list == ListSpec(delimiter="|", pooling="mean", max_length=4)
    assert [f.name for f in c.fields if f.side == "item"] == ["item_price", "item_id", "item_category",
                                                               "item_brand", "item_genres"]
    assert c.field("hour").side == "context" and c.field("item_price").side == "item"
    assert [f.name for f in c.side("user")] == ["user_id", "user_age", "user_gender", "user_city", "hour"]
    assert [f.name for f in c.side("item")] == ["item_price", "item_id", "item_category", "item_brand",
                                                "item_genres"]
    assert c.side("context") == (c.field("hour"),)


def test_defaults():
    raw = recall_raw()
    del cat(raw, "hour")["side"]
    raw["categorical"]["fields"]["item_genres"]["list"] = {"delimiter": ";"}
    del raw["recall"]["random_negatives"]
    c = parse_contract(raw)
    assert c.field("hour").side == "context"
    assert c.field("item_genres").list == ListSpec(delimiter=";", pooling="sum", max_length=32)
    assert c.recall is not None and c.recall.random_negatives == 0
    criteo = load_contract(CONF / "criteo.yaml")
    assert criteo.recall is None and {f.side for f in criteo.fields} == {"context"}
    assert all(f.list is None for f in criteo.categorical)
    assert criteo.side("user") == criteo.fields and criteo.side("item") == ()


Edit = Callable[[dict[str, Any]], Any]


@pytest.mark.parametrize("edit, message", [
    (lambda d: cat(d, "user_age").update(side="left"), "categorical.fields.user_age.side: 'left' is not one of user, item, context"),
    (lambda d: d["continuous"]["fields"]["item_price"].update(side="both"), "continuous.fields.item_price.side: 'both'"),
    (lambda d: cat(d, "item_genres")["list"].update(delimiter="\t"),
     "categorical.fields.item_genres.list.delimiter: '\\t' is also source.delimiter"),
    (lambda d: cat(d, "item_genres")["list"].update(delimiter="||"),
     "categorical.fields.item_genres.list.delimiter: must be one character"),
    (lambda d: cat(d, "item_genres")["list"].update(pooling="max"),
     "categorical.fields.item_genres.list.pooling: 'max' is not one of sum, mean"),
    (lambda d: cat(d, "item_genres")["list"].update(max_length=0), "categorical.fields.item_genres.list.max_length"),
    (lambda d: cat(d, "item_genres")["list"].pop("delimiter"),
     "categorical.fields.item_genres.list.delimiter: required key is missing"),
    (lambda d: cat(d, "item_genres")["list"].update(sep="|"), "categorical.fields.item_genres.list.sep: unknown key"),
    (lambda d: cat(d, "item_genres").update(list="|"), "categorical.fields.item_genres.list: expected a mapping"),
    (lambda d: cat(d, "user_id").update(side="item"),
     "recall.user_key: field 'user_id' has side 'item'; the user key must have side 'user'"),
    (lambda d: cat(d, "item_id").update(side="context"),
     "recall.item_key: field 'item_id' has side 'context'; the item key must have side 'item'"),
    (lambda d: d["recall"].update(item_key="item_genres"), "recall.item_key: field 'item_genres' is list-valued"),
    (lambda d: cat(d, "user_id").update(min_count=2), "recall.user_key: field 'user_id' has min_count 2"),
    (lambda d: d["recall"].update(user_key="nobody"), "recall.user_key: 'nobody' is not a categorical field"),
    (lambda d: d["recall"].update(item_key="item_price"), "recall.item_key: 'item_price' is not a categorical field"),
    (lambda d: d["recall"].pop("item_key"), "recall.item_key: required key is missing"),
    (lambda d: d["recall"].update(k=1), "recall.k: unknown key"),
    (lambda d: d["recall"].update(random_negatives=-1), "recall.random_negatives"),
    # no item fields at all: the item key is the field that says so (pipeline.contract's last check, a
    # contract with fields of one side only, cannot be reached once both keys have their sides)
    (lambda d: [f.update(side="user") for f in d["categorical"]["fields"].values()]
     + [d["continuous"]["fields"]["item_price"].update(side="user")],
     "recall.item_key: field 'item_id' has side 'user'; the item key must have side 'item'"),
])
def test_every_refusal_names_its_key(edit: Edit, message: str):
    raw = recall_raw()
    edit(raw)
    with pytest.raises(ContractError, match="^" + re.escape(message)):
        parse_contract(raw)


def test_a_contract_without_user_fields_is_refused():
    raw = recall_raw()
    for n, f in raw["categorical"]["fields"].items():
        f["side"] = "item"
    raw["recall"]["user_key"] = "item_brand"
    with pytest.raises(ContractError, match="recall.user_key: field 'item_brand' has side 'item'"):
        parse_contract(raw)


def test_to_raw_round_trips():
    c = load_contract(RECALL)
    assert parse_contract(c.to_raw()) == c
    assert parse_contract(yaml.safe_load(yaml.safe_dump(c.to_raw(), sort_keys=False))) == c        # through YAML text too
    assert c.to_raw()["categorical"]["fields"]["item_genres"]["list"] == {"delimiter": "|", "pooling": "mean",
                                                                           "max_length": 4}
    assert "list" not in c.to_raw()["categorical"]["fields"]["user_id"]
    criteo = load_contract(CONF / "criteo.yaml")
    assert parse_contract(criteo.to_raw()) == criteo and "recall" not in criteo.to_raw()
    longer = c.with_overrides(**{"categorical.fields.item_genres.list.max_length": 8})
    assert longer.field("item_genres").list == ListSpec(delimiter="|", pooling="mean", max_length=8)


def test_fingerprints_old_contracts_keep_theirs_and_list_changes_it():
    criteo = load_contract(CONF / "criteo.yaml")
    assert criteo.fingerprint == "dbdf2dba02d6a285"
    raw = criteo.to_raw()
    raw["categorical"]["fields"]["C1"]["list"] = {"delimiter": "|"}
    listed = parse_contract(raw)
    assert listed.fingerprint != criteo.fingerprint
    raw["categorical"]["fields"]["C1"]["list"] = {"delimiter": "|", "pooling": "mean"}
    assert parse_contract(raw).fingerprint not in (criteo.fingerprint, listed.fingerprint)
    # a side says which tower reads a field, not what its ids mean
    assert criteo.with_overrides(**{"categorical.fields.C1.side": "item"}).fingerprint == criteo.fingerprint
    c = load_contract(RECALL)
    assert c.with_overrides(**{"recall.random_negatives": 4}).fingerprint == c.fingerprint
