"""Preview only: the image family's rebuilt picture x̂ as a JPEG, no task model (a person watching
the stream, at the bandwidth of the machine-vision stream)."""

from __future__ import annotations

from collections.abc import Sequence

from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.models import family_of
from palettelink.models.image import rebuilt_image
from server.results import TaskOutput
from server.tasks import register
from server.tasks.zoo import preview_jpeg


@register("preview")
class PreviewRunner:
    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.bundle = bundle

    @classmethod
    def supports(cls, bundle: Bundle) -> bool:
        return family_of(bundle) == "image"

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = True) -> list[TaskOutput]:
        return [TaskOutput(preview_jpeg=preview_jpeg(rebuilt_image(d.tensors[0], d.image_size,
                                                                   self.bundle.input_size)))
                for d in items]

    def warmup(self) -> None:
        return None
