"""How the server's int8 rule was chosen: on 32 training images neither calibrated on (the 24 the build
uses) nor evaluated on, each int8 variant of the decoder and tail against the fp32 onnxruntime path:
the decoded tensors' relative L2 error, the class scores' mean absolute error (anchors the fp32 path
scores above 0.01), and the tail alone on the uncompressed front's tensors (what baseline carries).
Calibration feeds are whole latents (percentile calibration needs one shape).

    python docs/results/lso-deployed/paired/probe.py > probe.log
"""

import json
from pathlib import Path

import numpy as np

from palettelink.bundle import Bundle
from palettelink.codecs import make_encoder
from palettelink.front import Front
from palettelink.image import letterbox
from palettelink.models.ultra_ort import OrtTail, server_session
from palettelink.train import data
from palettelink.train.int8_serve import ServePath, _feeds, linear_convs, output_convs
from palettelink.train.onnx_int8 import quantise

BUNDLE = Path("bundles/fall-yolov8/1")
VARIANTS = {"minmax": ("minmax", False), "minmax+heads": ("minmax", True),
            "percentile+heads": ("percentile", True)}


def score_error(got: np.ndarray, ref: np.ndarray) -> float:
    a, r = got[0, 4:], ref[0, 4:]
    m = r.max(0) > 0.01
    return float(np.abs(a[:, m] - r[:, m]).mean()) if m.any() else 0.0


def main(work: Path = Path(".cache/int8-probe")) -> None:
    work.mkdir(parents=True, exist_ok=True)
    b = Bundle.load(BUNDLE, verify=False)
    items = data.training_images()
    calib = data.spread(items, 24)
    names = {str(i) for i in calib}
    probe = data.load_all_rgb(data.spread([i for i in items if str(i) not in names], 32))
    enc = make_encoder(b, "palette")
    dec_feeds, tail_feeds = _feeds(b, data.load_all_rgb(calib), enc.levels(), 2)
    payloads = [enc.encode(rgb).payload for rgb in probe]
    front = Front(b, 2, precision="fp32")
    uncompressed = [front.run_tensor(letterbox(rgb, b.input_size)[0]) for rgb in probe]

    def run(path: ServePath) -> list:
        out = []
        for p in payloads:
            d = path.decoder.decode(p)
            out.append((d.tensors, path.tail.run(d.tensors)))
        return out

    fp32 = ServePath(b, None, None, True, 2)
    ref = run(fp32)
    print(json.dumps({"decoder output convolutions": output_convs(b.file("decoder.onnx"))}))
    for name, (cal, heads) in VARIANTS.items():
        d8, t8 = work / f"decoder-{name}.onnx", work / f"tail-{name}.onnx"
        quantise(b.file("decoder.onnx"), d8, dec_feeds, calibration=cal,
                 exclude=output_convs(b.file("decoder.onnx")) if heads else ())
        quantise(b.file("tail.onnx"), t8, tail_feeds, exclude=linear_convs(b.file("tail.onnx")),
                 calibration=cal)
        got = run(ServePath(b, d8, t8, True, 2))
        pairs = list(zip(got, ref, strict=True))
        tensor_err = [np.mean([np.linalg.norm(a - c) / (np.linalg.norm(c) + 1e-9)
                               for a, c in zip(g[0], r[0], strict=True)]) for g, r in pairs]
        tail8 = OrtTail(b, 2, precision="fp32")
        tail8.session = server_session(str(t8), 2)
        unc_err = [score_error(tail8.run(t), fp32.tail.run(t)) for t in uncompressed]
        print(json.dumps({
            "variant": name, "tensor_rel_err": round(float(np.mean(tensor_err)), 4),
            "score_abs_err": round(float(np.mean([score_error(g[1], r[1]) for g, r in pairs])), 5),
            "tail_on_uncompressed_score_abs_err": round(float(np.mean(unc_err)), 5)}), flush=True)


if __name__ == "__main__":
    main()
