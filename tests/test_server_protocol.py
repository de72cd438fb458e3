"""MRD framing: every message type round trips; NUL handling; limits checked before reading."""

from __future__ import annotations

import socket
import struct
import threading

import ismrmrd
import numpy as np
import pytest

from perfline.server.protocol import (
    Close,
    Header,
    IdleTimeoutError,
    MessageReader,
    MessageTooLargeError,
    PeerClosedError,
    ProtocolError,
    ProtocolLimits,
    Text,
    TruncatedMessageError,
    UnknownMessageError,
    encode_message,
)


def read_all(payload: bytes, limits: ProtocolLimits | None = None) -> list[object]:
    """Messages decoded from ``payload`` sent through a real socket pair (small chunks)."""
    left, right = socket.socketpair()

    def feed() -> None:
        for start in range(0, len(payload), 777):  # odd chunking exercises partial reads
            left.sendall(payload[start:start + 777])
        left.close()

    thread = threading.Thread(target=feed)
    thread.start()
    reader = MessageReader(right, limits or ProtocolLimits(idle_timeout_s=5))
    messages: list[object] = []
    try:
        while True:
            message = reader.read_message()
            messages.append(message)
            if isinstance(message, Close):
                return messages
    finally:
        thread.join()
        right.close()


def test_all_message_types_round_trip() -> None:
    acquisition = ismrmrd.Acquisition.from_array(
        (np.arange(24) + 1j * np.arange(24)).astype(np.complex64).reshape(2, 12),
        np.arange(24, dtype=np.float32).reshape(12, 2), scan_counter=7)
    image = ismrmrd.Image.from_array(np.arange(60, dtype=np.float32).reshape(1, 1, 6, 10), image_index=3)
    image.meta = ismrmrd.Meta({"GADGETRON_DataRole": "Image", "list": ["1", "2"]})
    waveform = ismrmrd.Waveform.from_array(np.arange(10, dtype=np.uint32).reshape(2, 5), waveform_id=1)
    sent = [ismrmrd.ConfigFile("cartesian-recon"), ismrmrd.ConfigText("name = 'x'"),
            Header("<ismrmrdHeader/>"), Text('{"a": 1}'), acquisition, image, waveform, Close()]
    received = read_all(b"".join(encode_message(m) for m in sent))
    assert [type(m) for m in received] == [type(m) for m in sent]
    assert received[0] == "cartesian-recon" and received[1] == "name = 'x'"
    assert received[2] == Header("<ismrmrdHeader/>") and received[3] == Text('{"a": 1}')
    assert received[4].getHead() == acquisition.getHead()
    np.testing.assert_array_equal(received[4].data, acquisition.data)
    np.testing.assert_array_equal(received[4].traj, acquisition.traj)
    assert received[5] == image
    assert received[6].getHead() == waveform.getHead()
    np.testing.assert_array_equal(received[6].data, waveform.data)


@pytest.mark.parametrize("nul", [False, True], ids=["cpp", "fire"])
def test_strings_with_and_without_trailing_nul(nul: bool) -> None:
    sent = [Header("<x/>"), Text("hello"), ismrmrd.ConfigText("chain"), Close()]
    payload = b"".join(encode_message(m, nul_terminate=nul) for m in sent)
    assert (b"hello\x00" in payload) is nul
    received = read_all(payload)
    assert received[:3] == [Header("<x/>"), Text("hello"), "chain"]


def test_unknown_id_and_truncation_are_specific_errors() -> None:
    with pytest.raises(UnknownMessageError, match="unknown message id 7"):
        read_all(struct.pack("<H", 7))
    with pytest.raises(TruncatedMessageError, match="stream ended inside text message: expected 10 bytes, got 3"):
        read_all(struct.pack("<HI", 5, 10) + b"abc")
    with pytest.raises(TruncatedMessageError, match="message id"):
        read_all(b"\x05")
    with pytest.raises(PeerClosedError, match="without a CLOSE message"):
        read_all(encode_message(Text("x")))


def test_sizes_are_checked_before_reading() -> None:
    limits = ProtocolLimits(max_message_bytes=4096, max_text_bytes=1024, idle_timeout_s=5)
    image = ismrmrd.Image.from_array(np.zeros((1, 1, 64, 64), np.float32))
    head = encode_message(image)[:2 + 198 + 8]  # id, header, attribute length: no data needed
    with pytest.raises(MessageTooLargeError, match="image data of 16384 bytes exceeds the limit of 4096"):
        read_all(head, limits)
    with pytest.raises(MessageTooLargeError, match="text message of 4294967295 bytes"):
        read_all(struct.pack("<HI", 5, 0xFFFFFFFF), limits)


def test_invalid_utf8_and_meta_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        read_all(struct.pack("<HI", 5, 2) + b"\xff\xfe")
    image = ismrmrd.Image.from_array(np.zeros((1, 1, 2, 2), np.float32))
    raw = bytearray(encode_message(image))
    bad_meta = b"<notmeta/>"
    raw[2 + 198:2 + 198 + 8] = struct.pack("<Q", len(bad_meta))
    raw[2 + 198 + 8:2 + 198 + 8] = bad_meta
    with pytest.raises(ProtocolError, match="not valid ismrmrdMeta XML"):
        read_all(bytes(raw))


def test_idle_peer_times_out() -> None:
    left, right = socket.socketpair()
    try:
        reader = MessageReader(right, ProtocolLimits(idle_timeout_s=0.2))
        with pytest.raises(IdleTimeoutError, match="no data from the peer for 0.2 s"):
            reader.read_message()
    finally:
        left.close()
        right.close()


def test_config_file_name_length_is_checked() -> None:
    with pytest.raises(ValueError, match="at most 1023"):
        encode_message(ismrmrd.ConfigFile("x" * 1024))
    with pytest.raises(TypeError, match="cannot send int"):
        encode_message(3)


def test_meta_xml_joins_plain_values_and_escapes_the_others_as_ismrmrd() -> None:
    """The joined fast path (plain texts) and the per-item path (a value needing escapes, or one holding the
    join's separator character) both write ismrmrd's own text."""
    from perfline.server.protocol import meta_xml

    for meta in ({"ROI_endo": [f"{x:.3f}" for x in range(50)]}, {"mixed": ["1.5", "a<b", "c"]},
                 {"sep": ["a\x1fb", "c"]}, {"one": "x&y"}, {"empty": []}):
        assert meta_xml(meta) == ismrmrd.Meta(meta).serialize()


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.uint16, np.int16, np.float64])
def test_image_bytes_are_ismrmrds_own(dtype: type) -> None:
    """The fast meta serialiser writes exactly what ismrmrd's ElementTree one writes, for
    plain, list, empty-list, numeric, escaped and non-ASCII attributes and for no meta."""
    from perfline.server.protocol import image_bytes, meta_xml

    rng = np.random.default_rng(3)
    data = (rng.standard_normal((2, 5, 7)) * 100).astype(dtype)
    metas = [{}, {"GADGETRON_DataRole": "Gd", "ROI_endo": [f"{x:.2f}" for x in rng.random(300)]},
             {"a&b": ["<x>", "q'\"", "é∂ → mmol/L"], "n": 3, "empty": [], "f": 1.5, "one": ["single"]}]
    for meta in metas:
        image = ismrmrd.Image.from_array(data)
        image.meta = ismrmrd.Meta(meta)
        image.image_series_index = 7
        assert meta_xml(image.meta) == image.meta.serialize()
        assert image_bytes(image) == image.to_bytes()
        decoded = read_all(encode_message(image) + encode_message(Close()))[0]
        assert np.array_equal(decoded.data, image.data)
        assert dict(decoded.meta) == dict(ismrmrd.Meta.deserialize(image.meta.serialize()))
