"""The default configuration end to end, paired: each edge graph (fp32 / int8, the frame's window,
the default level) through each server path (the float one: fp32 decoder + torch tail; the server's
onnxruntime path with given int8 decoder and tail files, or fp32), AP50 against the uncompressed
pipeline on the leave-source-out frames, every configuration on the same bootstrap draws.

    python docs/results/lso-deployed/paired/paired.py [DECODER_INT8 TAIL_INT8 [OUT.json]]
"""

import json
import sys
from pathlib import Path

from palettelink import bitstream
from palettelink.bundle import Bundle
from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder
from palettelink.front import Front
from palettelink.image import letterbox
from palettelink.models.ultra import SplitDetector
from palettelink.scoring import bootstrap_ap50, evaluate
from palettelink.train import data
from palettelink.train.int8_serve import ServePath

BUNDLE = Path("bundles/fall-yolov8/1")
KEYS = ("fp32 edge, torch server", "int8 edge, torch server", "fp32 edge, int8 server",
        "int8 edge, int8 server", "int8 edge, fp32 ort server")


def main() -> None:
    b = Bundle.load(BUNDLE, verify=False)
    dec_int8 = Path(sys.argv[1]) if len(sys.argv) > 1 else BUNDLE / "decoder.int8.onnx"
    tail_int8 = Path(sys.argv[2]) if len(sys.argv) > 2 else BUNDLE / "tail.int8.onnx"
    out_file = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("paired.json")
    det = SplitDetector.from_bundle(b)
    front = Front(b, 2, precision="fp32")
    items = data.spread(data.eval_images(), 0)
    e32 = PaletteEncoder(b, 2, precision="fp32")
    e8 = PaletteEncoder(b, 2, precision="auto")
    e32.window = e8.window = True
    level = e32.default_level()
    dec = PaletteDecoder(b, 2)
    served8 = ServePath(b, dec_int8, tail_int8, True, 2)
    served32 = ServePath(b, None, None, True, 2)
    refs: list = []
    sets: dict[str, list] = {k: [] for k in KEYS}
    for rgb in data.load_all_rgb(items):
        x, lb = letterbox(rgb, b.input_size)
        refs.append([d for d in det.detect_tensors(front.run_tensor(x), lb, conf=0.001) if d.score >= 0.25])
        p32, p8 = e32.encode(rgb, level).payload, e8.encode(rgb, level).payload
        for p, k in ((p32, KEYS[0]), (p8, KEYS[1])):
            d = dec.decode_frame(bitstream.unpack(p), len(p))
            sets[k].append(det.detect_tensors(d.tensors, lb, conf=0.001))
        sets[KEYS[2]].append(served8.detect(p32)[0])
        sets[KEYS[3]].append(served8.detect(p8)[0])
        sets[KEYS[4]].append(served32.detect(p8)[0])
    boot = bootstrap_ap50(refs, [sets[k] for k in KEYS], strata=data.source_names(items))
    out = {k: {"ap50": round(evaluate(refs, sets[k]).ap50, 4),
               "ci95": [round(v, 4) for v in boot.interval[i]],
               "minus_first_ci95": [round(v, 4) for v in boot.difference[i]] if i else None}
           for i, k in enumerate(KEYS)}
    out_file.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
