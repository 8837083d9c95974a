"""The vLLM-version seam (``backend/compat.py``), on the installed vLLM and on versions given by hand.

The installed vLLM of the test suite is 0.32 (CPU build). The same checks run against the Python packages
of vLLM 0.33 and 0.34 in ``tests/backend/test_vllm_versions.py``, where those environments exist.
"""
import pytest

from vllm_int4kv.backend import compat


def test_versions_are_read_and_the_range_is_enforced():
    assert compat.parse_version("0.32.0+cpu") == (0, 32) and compat.parse_version("0.34.0rc1") == (0, 34)
    assert compat.unsupported_version((0, 32)) is None and compat.unsupported_version((0, 34)) is None
    for version in ((0, 31), (0, 35), (1, 0)):
        message = compat.unsupported_version(version)
        assert f"supports vLLM 0.32 to 0.34; this is vLLM {version[0]}.{version[1]}" in message
    with pytest.raises(ValueError, match="cannot read a vLLM version"):
        compat.parse_version("dev")


def test_our_own_cache_dtype_name_exists_from_0_33():
    assert compat.cache_dtypes((0, 32)) == ("auto", "int4_per_token_head")
    assert compat.cache_dtypes((0, 33)) == compat.cache_dtypes((0, 34)) == ("auto", "int4_per_token_head", "int4kv")


def test_the_installed_vllm_is_supported_and_registration_follows_its_version():
    version = compat.vllm_version()
    assert compat.unsupported_version() is None
    assert compat.register_own_cache_dtype() is (version >= (0, 33))


def test_an_unsupported_vllm_stops_start_up_with_the_range(monkeypatch):
    from vllm_int4kv.backend.attention_backend import Int4KVBackend

    monkeypatch.setattr(compat, "vllm_version", lambda: (0, 35))
    reasons = Int4KVBackend.validate_configuration(
        head_size=64, dtype=__import__("torch").float16, kv_cache_dtype="auto", block_size=16, use_mla=False,
        has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
        device_capability=None, attn_type="decoder")
    assert any("supports vLLM 0.32 to 0.34; this is vLLM 0.35" in r for r in reasons), reasons
