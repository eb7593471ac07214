"""Fault drills: make chosen clients misbehave on purpose, to see the server reject them.

``fault-drill`` in the run config is a comma-separated list of ``country:fault``. Faults:

* ``corrupt``      flip bytes in the middle of the uploaded ciphertext (or plaintext vector);
* ``wrong-length`` upload a vector one value short;
* ``foreign-key``  encrypt under a freshly generated key (the client's fingerprint then differs);
* ``nan``          train to a NaN model (the client's own check refuses to encode it).

Guarantee: with an empty ``fault-drill`` (the default) nothing here touches a reply.
"""

from __future__ import annotations

import numpy as np

FAULTS = ("corrupt", "wrong-length", "foreign-key", "nan",
          "mask-impostor", "mask-bad-key", "mask-replay")   # the last three: carbonfed.federation.client.masking


def parse_drill(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        country, _, fault = item.rpartition(":")
        if fault not in FAULTS or not country:
            raise ValueError(f"fault-drill item {item!r}: expected 'country:fault' with fault in {FAULTS}")
        out[country] = fault
    return out


def corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    mid = len(b) // 2
    b[mid:mid + 16] = bytes(x ^ 0xFF for x in b[mid:mid + 16])
    return bytes(b)


def nan_params(params: np.ndarray) -> np.ndarray:
    out = np.array(params, dtype=np.float64)
    out[0] = np.nan
    return out
