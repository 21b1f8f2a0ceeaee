"""Suite-wide fixtures.

model.dtype defaults to 'auto', which is bfloat16 on a machine with native bf16 matmuls (a GPU, an AVX-512 BF16 / AMX
CPU) and float32 elsewhere. Tests pin 'auto' to float32, so that the values they compare do not depend on the CPU
they run on; the tests of the resolution patch `native_bf16` themselves, and the probe's own test calls
`REAL_NATIVE_BF16`.
"""

from __future__ import annotations

import pytest

import layerroute.model

REAL_NATIVE_BF16 = layerroute.model.native_bf16


@pytest.fixture(autouse=True)
def auto_dtype_is_float32(monkeypatch):
    monkeypatch.setattr(layerroute.model, "native_bf16", lambda device: False)
