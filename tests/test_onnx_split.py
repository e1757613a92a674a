"""Splitting an ONNX graph: every tensor the tail reads from the front crosses, and front + tail ==
whole. A small FPN-like network (three strides, skips into the head) stands in for a detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from palettelink.errors import BundleError
from palettelink.models.onnx_split import plan_split, split_model, verify_split


class TinyFPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.c3 = nn.Conv2d(16, 32, 3, 2, 1)
        self.l2 = nn.Conv2d(16, 8, 1)
        self.l3 = nn.Conv2d(32, 8, 1)
        self.head = nn.Conv2d(8, 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        c = torch.relu(self.c3(b))
        p = self.l2(b) + nn.functional.interpolate(self.l3(c), scale_factor=2.0)
        return torch.sigmoid(self.head(p))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.manual_seed(0)
    torch.onnx.export(TinyFPN().eval(), (torch.rand(1, 3, 64, 64),), str(path), input_names=["images"],
                      output_names=["scores"], opset_version=17, dynamo=False)
    return path


def _relu_outputs(path: Path) -> list[str]:
    import onnx

    return [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]


def test_a_cut_after_the_backbone_carries_the_skip_as_well(tiny_onnx: Path, tmp_path: Path) -> None:
    relus = _relu_outputs(tiny_onnx)
    plan = plan_split(tiny_onnx, [relus[2]])  # after c3: the head also reads b (stride 4)
    assert [c.shape for c in plan.crossing] == [(16, 16, 16), (32, 8, 8)]
    split_model(tiny_onnx, plan, tmp_path / "front.onnx", tmp_path / "tail.onnx")
    xs = [np.random.default_rng(i).random((1, 3, 64, 64), dtype=np.float32) for i in range(3)]
    assert verify_split(tiny_onnx, tmp_path / "front.onnx", tmp_path / "tail.onnx", xs) < 1e-5


def test_auto_cut_picks_the_smallest_crossing_in_the_second_half(tiny_onnx: Path) -> None:
    plan = plan_split(tiny_onnx, "auto")
    assert plan.tail_nodes > 0 and plan.crossing
    relus = _relu_outputs(tiny_onnx)
    assert plan.floats <= plan_split(tiny_onnx, [relus[2]]).floats


def test_unknown_cut_names_list_candidate_tensors(tiny_onnx: Path) -> None:
    with pytest.raises(BundleError, match="not produced by any node.*candidates: .*"):
        plan_split(tiny_onnx, ["no_such_tensor"])


def test_a_tail_that_reads_the_input_is_refused(tiny_onnx: Path) -> None:
    relus = _relu_outputs(tiny_onnx)
    with pytest.raises(BundleError):  # cutting after c1 only is fine; a cut on the input is not a split
        plan_split(tiny_onnx, ["images"])
    assert plan_split(tiny_onnx, [relus[0]]).crossing[0].shape == (8, 32, 32)


def test_a_split_that_does_not_match_the_whole_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    relus = _relu_outputs(tiny_onnx)
    plan = plan_split(tiny_onnx, [relus[2]])
    split_model(tiny_onnx, plan, tmp_path / "front.onnx", tmp_path / "tail.onnx")
    other = tmp_path / "other.onnx"
    torch.manual_seed(1)
    torch.onnx.export(TinyFPN().eval(), (torch.rand(1, 3, 64, 64),), str(other), input_names=["images"],
                      output_names=["scores"], opset_version=17, dynamo=False)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    with pytest.raises(BundleError, match="differ from the whole model"):
        verify_split(other, tmp_path / "front.onnx", tmp_path / "tail.onnx", [x])
