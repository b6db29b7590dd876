"""The table of TensorRT-LLM APIs fish_s2.trtllm relies on (fish_s2/trtllm/api_contract.py): each entry is
tied to the code that uses it, and the checker works on objects that stand in for the installed package."""

import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fish_s2.trtllm import api_contract as api
from fish_s2.trtllm.state import SlotManager

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("e", api.EXPECTED, ids=lambda e: e.target)
def test_every_entry_is_used_where_it_says(e):
    source = (REPO / e.used_in).read_text()
    assert (e.needle in source) != e.pending, (e.used_in, e.needle, "pending" if e.pending else "")


def test_model_calls_are_in_the_table():
    """Every tensorrt_llm name model.py imports has an entry."""
    source = (REPO / "fish_s2/trtllm/model.py").read_text()
    imported = {n.strip() for block in re.findall(r"from tensorrt_llm[\w.]* import \(?([^)]*?)\)?\n", source)
                for n in block.replace("\n", " ").split(",") if n.strip()}
    targets = {e.target.split(":")[1].split(".")[0] for e in api.EXPECTED}
    assert imported and imported <= targets, imported - targets


def _fake(monkeypatch, name: str, **attrs) -> None:
    mod = ModuleType(name)
    mod.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, mod)


def test_check_reports_missing_params_attrs_and_setters(monkeypatch):
    class Args:
        max_batch_size = 1

        @property
        def extra_resource_managers(self):  # read-only: assigning it would fail
            return {}

    def generate_async(self, inputs, sampling_params=None, streaming=False):  # no cache_salt
        pass

    class LLM:
        pass

    LLM.generate_async = generate_async
    _fake(monkeypatch, "fake_trt", LLM=LLM, Args=Args)
    row = api.check_one(api.Expect("fake_trt:LLM.generate_async", "", "", params=("inputs", "streaming", "cache_salt")))
    assert not row["ok"] and row["missing"] == ["param cache_salt"] and "streaming" in row["signature"]
    row = api.check_one(api.Expect("fake_trt:Args", "", "", attrs=("max_batch_size", "max_seq_len"),
                                   settable=("extra_resource_managers",)))
    assert row["missing"] == ["attr max_seq_len", "settable extra_resource_managers"]
    Args.extra_resource_managers = Args.extra_resource_managers.setter(lambda self, v: None)
    assert api.check_one(api.Expect("fake_trt:Args", "", "", settable=("extra_resource_managers",)))["ok"]
    assert api.check_one(api.Expect("fake_trt:Nope", "", "", optional=True))["ok"]
    assert not api.check_one(api.Expect("no_such_module_xyz:X", "", ""))["ok"]


def test_slot_manager_implements_the_resource_manager_protocol(monkeypatch):
    import abc

    class BaseResourceManager(abc.ABC):  # TensorRT-LLM 1.2's abstract methods (resource_manager.py)
        @abc.abstractmethod
        def get_max_resource_count(self): ...

        @abc.abstractmethod
        def get_needed_resource_to_completion(self, request): ...

        def prepare_resources(self, scheduled_batch): ...

        def update_resources(self, scheduled_batch): ...

        def free_resources(self, request): ...

        def shutdown(self): ...

    _fake(monkeypatch, "tensorrt_llm._torch.pyexecutor.resource_manager", BaseResourceManager=BaseResourceManager)
    assert api.resource_manager_gaps() == []
    assert api.resource_manager_gaps(type("Bare", (), {})) == ["get_max_resource_count", "get_needed_resource_to_completion"]
    for name in ("prepare_resources", "update_resources", "free_resources", "shutdown", "add_dummy_requests"):
        assert callable(getattr(SlotManager, name))
    assert list(inspect.signature(SlotManager.update_resources).parameters)[:2] == ["self", "scheduled_batch"]


def test_table_without_tensorrt_llm():
    rows = api.table()
    assert len(rows) == len(api.EXPECTED) and all({"target", "params", "attrs", "used_in"} <= set(r) for r in rows)
    assert any(r["target"].endswith("generate_async") and "cache_salt" in r["params"] for r in rows)
