"""inspect folds the past/present tensors per shape, so Gemma 4's wider global entries are
not shown with the sliding entries' shape."""

from gemma_export.runtime.inspect import _fold_kv


def test_uniform_cache_folds_to_one_line_per_kind():
    specs = {"input_ids": "i", **{f"past_key_values.{i}.{t}": "s" for i in range(3) for t in ("key", "value")}}
    assert list(_fold_kv(specs)) == ["input_ids", "past_key_values.{0..2}.key", "past_key_values.{0..2}.value"]


def test_entries_of_two_shapes_fold_separately():
    shape = {0: "a", 1: "a", 2: "b", 3: "a"}
    specs = {f"present.{i}.{t}": shape[i] for i in range(4) for t in ("key", "value")}
    assert _fold_kv(specs) == {"present.{0,1,3}.key": "a", "present.{0,1,3}.value": "a",
                               "present.{2}.key": "b", "present.{2}.value": "b"}
