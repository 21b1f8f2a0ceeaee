"""Suite-wide fixtures.

model.dtype defaults to 'auto', which is bfloat16 on a machine with native bf16 matmuls (a GPU, an AVX-512 BF16 / AMX
CPU) and float32 elsewhere. Tests pin 'auto' to float32, so that the values they compare do not depend on the CPU
they run on; the tests of the resolution patch `native_bf16` themselves, and the probe's own test calls
`REAL_NATIVE_BF16`. The pin is session-wide: module-scoped fixtures (the tiny models most test files share) are built
before any function-scoped fixture runs, so a per-test patch would leave them in bfloat16 on a bf16 machine (31 tests
failed so on the AMD EPYC with AVX-512 BF16 of 2026-12-07, session 21).
"""

from __future__ import annotations

import pytest

import layerroute.model

REAL_NATIVE_BF16 = layerroute.model.native_bf16


@pytest.fixture(autouse=True, scope="session")
def auto_dtype_is_float32():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layerroute.model, "native_bf16", lambda device: False)
        yield
