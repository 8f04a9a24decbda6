"""The flat layout's module paths still work after the move into stage folders: imports warn and name the new home,
and pickles (graphopt.save, torch.save) that name the old paths load."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch

import graphopt
import graphopt.analysis.sparsity
import graphopt.graph.module
import graphopt.graph.pickling  # named below as attributes: import them, whatever other tests imported first
from graphopt._moved import MOVED
from graphopt.examples.models import example_model


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_gives_the_new_modules_objects_with_a_warning(old):
    new = importlib.import_module(MOVED[old])
    public = [n for n in getattr(new, "__all__", dir(new)) if not n.startswith("_")]
    assert public, f"{MOVED[old]} has no public names"
    alias = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{public[0]} moved to {MOVED[old]}\.{public[0]}"):
        assert getattr(alias, public[0]) is getattr(new, public[0])


def test_pickles_that_name_the_old_paths_load():
    for old, name, new in [("graphopt.graph_pickle", "rebuild", graphopt.graph.pickling.rebuild),
                           ("graphopt.graph_module", "GraphoptModule", graphopt.graph.module.GraphoptModule),
                           ("graphopt.sparsity", "WeightMask", graphopt.analysis.sparsity.WeightMask)]:
        stream = f"c{old}\n{name}\n.".encode()  # a protocol-0 global reference, as old files hold it
        with pytest.warns(DeprecationWarning):
            assert pickle.loads(stream) is new


def test_a_result_saved_today_names_only_the_new_paths_and_reloads(tmp_path):
    model, inputs = example_model()
    res = graphopt.optimize(model, ["prune-channels:ratio=0.5"], inputs)
    data = pickle.dumps(res.module)
    assert b"graphopt.graph.module" in data and b"graphopt.graph_module" not in data
    torch.testing.assert_close(pickle.loads(data)(*inputs), res.module(*inputs))


def test_graphopt_lower_is_now_streamline():
    with pytest.warns(DeprecationWarning, match="graphopt.lower is now graphopt.streamline"):
        assert graphopt.lower is graphopt.streamline
    with pytest.warns(DeprecationWarning, match=r"graphopt.lower.lower moved to graphopt.export.streamline.streamline"):
        assert importlib.import_module("graphopt.lower").lower is graphopt.streamline
