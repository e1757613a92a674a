"""Model families: every bundle, whatever its origin, is a split model behind one small interface.

- ``front``: the edge half, always ``front.onnx`` (image [1,3,S,S] in [0, 1] → crossing tensors), run
  by :class:`palettelink.front.Front`;
- ``tail``: the server half, crossing tensors (as the codec rebuilt them) → the task model's output;
- ``postprocess``: the task model's output → results in original-image pixels.

The family (``manifest["family"]``) says how the tail runs:

- ``ultralytics`` (:mod:`palettelink.models.ultra`): a YOLO split by its layer list, tail in torch;
- ``onnx`` (:mod:`palettelink.models.onnx_split`): any ONNX graph cut at named tensors, tail in
  onnxruntime (CUDA provider when present), postprocess from the model zoo;
- ``image`` (:mod:`palettelink.models.image`): the split is at the input, the crossing tensor is the
  image; the tail is the codec's generator (x̂) and any unsplit model-zoo model runs on x̂.
"""

from __future__ import annotations

from palettelink.bundle import Bundle
from palettelink.errors import BundleError

FAMILIES = ("ultralytics", "onnx", "image")


def family_of(bundle: Bundle) -> str:
    """The bundle's family (manifests written before families existed are ultralytics splits)."""
    fam = str(bundle.manifest.get("family", "ultralytics"))
    if fam not in FAMILIES:
        raise BundleError(f"bundle {bundle.id} is of family {fam!r}; this build knows {list(FAMILIES)}")
    return fam


def task_model(bundle: Bundle, task: str) -> tuple[str, str] | None:
    """(zoo model name, file in the bundle) that runs ``task`` on this bundle, if it names one."""
    entry = (bundle.manifest.get("task_models") or {}).get(task)
    if not isinstance(entry, dict):
        return None
    return str(entry["model"]), str(entry["file"])
