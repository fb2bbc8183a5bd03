#!/usr/bin/env python3
"""Writes the seed corpus of the frame_to_message target to seeds/frame_to_message/.

Each seed is what a client sends after the handshake: masked client frames (RFC 6455 5.3).
Run from this directory: python3 gen_seeds.py
"""
import json
import os

MASK = bytes([0x37, 0xFA, 0x21, 0x3D])
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "frame_to_message")


def frame(opcode, payload, fin=True, mask=MASK):
    """One masked client frame; payload under 126 bytes uses the 7-bit length, else 16-bit."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(payload, fin=True):
    return frame(0x1, payload, fin)


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


VALID = compact({
    "userId": 42,
    "username": "alice42",
    "message": "hi",
    "timestamp": "2026-01-01T00:00:00Z",
    "messageType": "TEXT",
    "roomId": "7",
})
VALID_FULL = compact({
    "userId": "00042",
    "username": "bob",
    "message": "caf\u00e9 \"quoted\"\n\U0001F600",
    "timestamp": "2026-11-21T22:41:01.123+05:30",
    "messageType": "join",
    "roomId": "7",
    "clientMessageId": "c42-000017",
})
INVALID = compact({"userId": 0, "username": "x", "message": "", "timestamp": "no", "messageType": "?"})

SEEDS = {
    # One valid message.
    "valid_text": text(VALID),
    # A valid JOIN with escapes, a string userId and a client key (16-bit length).
    "valid_full": text(VALID_FULL),
    # Every field invalid, then a room mismatch, then not JSON.
    "invalid": text(INVALID) + text(VALID.replace(b'"7"', b'"8"')) + text(b"[1,2]"),
    # A valid message split over a text frame and two continuation frames.
    "fragmented": text(VALID[:10], fin=False) + frame(0x0, VALID[10:30], fin=False) + frame(0x0, VALID[30:]),
    # A ping, a binary frame, a valid message and a close.
    "ping_binary_close": frame(0x9, b"ping") + frame(0x2, b"\x00\x01") + text(VALID)
    + frame(0x8, (1000).to_bytes(2, "big") + b"bye"),
}

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")
