"""device.cpu_native_bf16 and llm_default_dtype: the answer follows the flags torch reports, with a reason for each."""

from __future__ import annotations

import pytest

from moe_energy import device as precision


def test_it_answers_on_this_host():
    native, why = precision.cpu_native_bf16()
    assert isinstance(native, bool) and why and "\n" not in why


@pytest.mark.parametrize(("flags", "native", "says"), [
    ({"avx512_bf16": True, "amx_bf16": False, "amx_tile": False, "bf16": False}, True, "avx512_bf16 (oneDNN)"),
    ({"avx512_bf16": True, "amx_bf16": True, "amx_tile": True, "bf16": False}, True, "AMX bf16"),
    ({"avx512_bf16": False, "amx_bf16": False, "amx_tile": False, "bf16": True}, True, "arm64 bf16"),
    ({"avx512_bf16": False, "amx_bf16": False, "amx_tile": False, "bf16": False}, False, "emulated"),
])
def test_flags_decide(monkeypatch, flags, native, says):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "onednn_bf16", lambda: True)
    got, why = precision.cpu_native_bf16()
    assert got is native and says in why
