"""What the fuzzer sends its cases to: the server's decode path in-process (:class:`InProcess`) or a
real server's gRPC Analyze call (:class:`OverGrpc`). Each answers a case with its outcome: ``ok``, the
typed error's status, or ``hang``; a crash is an exception (:class:`Crash` from a server).
"""

from __future__ import annotations

import time
from typing import Any

from palettelink import bitstream, codecs
from palettelink.errors import PaletteLinkError


class InProcess:
    """``Decoder.decode`` (the server's entry for client bytes); outcomes of repeated frames cached."""

    def __init__(self, bundle: Any, skip_network: bool = False, cache: bool = True) -> None:
        from palettelink.codecs import Decoder

        overrides = {}
        if skip_network and "palette" in codecs.available(bundle):
            from palettelink.codecs import Decoded, spec

            real = spec("palette").decoder(bundle)

            class NoNetwork:
                codec = "palette"

                def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
                    r = real.decode_indices(frame)
                    real.tables.dequantise(r.indices, r.level)
                    return Decoded([], "palette", r.sent_level, frame.image_size, n_bytes, frame.truncated)

            overrides["palette"] = NoNetwork()
        if skip_network and "avif" in codecs.available(bundle):
            from palettelink.codecs import Decoded, spec

            avif = spec("avif").decoder(bundle)

            class NoFront:
                codec = "avif"

                def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
                    avif.picture(frame)  # type: ignore[attr-defined]
                    return Decoded([], "avif", frame.param, frame.image_size, n_bytes)

            overrides["avif"] = NoFront()
        self.decoder = Decoder(bundle, overrides)
        self.cache: dict[bitstream.Frame, str] | None = {} if cache else None
        self.cached = 0

    def __call__(self, payload: bytes) -> str:
        key = None
        if self.cache is not None:
            try:
                key = codecs.unpack(payload, allow_truncated_layers=True)  # unknown codec ids: no key
            except PaletteLinkError:
                key = None
            if key is not None and key in self.cache:
                self.cached += 1
                return self.cache[key]
        try:
            self.decoder.decode(payload)
            out = "ok"
        except PaletteLinkError as e:
            out = e.code
        if key is not None:
            self.cache[key] = out  # type: ignore[index]
        return out


def _available(bundle: Any) -> list[str]:
    from palettelink.codecs import available

    return available(bundle)


class Crash(Exception):
    pass


class OverGrpc:
    """The gRPC Analyze call of a real server; INTERNAL and UNKNOWN are crashes."""

    def __init__(self, address: str, bundle: str, token: str | None = None, timeout: float = 30.0) -> None:
        import grpc

        from palettelink.v1 import palettelink_pb2 as pb
        from palettelink.v1 import palettelink_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.PaletteLinkStub(self.channel)
        self.bundle, self.timeout = bundle, timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __call__(self, payload: bytes) -> str:
        grpc = self.grpc
        for attempt in range(20):
            try:
                r = self.stub.Analyze(self.pb.AnalyzeRequest(bundle=self.bundle, payload=payload),
                                      timeout=self.timeout, metadata=self.metadata).result
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 19:
                    time.sleep(0.05 * (attempt + 1))  # the server's Analyze cap: wait and send again
                    continue
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    raise Crash(f"{code.name}: {e.details()}") from None  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return "hang"
                return code.name
            if r.HasField("error"):
                if r.error.status in ("INTERNAL", "UNKNOWN"):
                    raise Crash(f"{r.error.status}: {r.error.message}")
                return r.error.status
            return "ok"
        return "RESOURCE_EXHAUSTED"

    def close(self) -> None:
        self.channel.close()
