"""Where calibration runs: the dtype vLLM serves in, a decision stored ahead of time that the engine finds,
models too large for one device refused with the ways out, and --device auto (spread over GPUs)."""
import json

import pytest
import torch
from test_calibration import token_ids, tiny_model

from vllm_int4kv import auto, calibration, calibration_device
from vllm_int4kv.calibration import Session, Settings
from vllm_int4kv.calibration_device import (CalibrationOutOfMemory, PlacementError, check_fits,
                                            serving_dtype, weight_bytes)
from vllm_int4kv.cli import main

FAST = Settings(n_prompts=2, max_tokens=96)
FAST_ARGS = ["--prompts", "2", "--max-tokens", "96"]
WAYS_OUT = ("--device auto", "--device cpu", "VLLM_INT4KV_POLICY")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder saved in fp32, as many small checkpoints are (vLLM serves those in bf16)."""
    build_tiny_llama = pytest.importorskip("vllm_int4kv.tiny_model").build_tiny_llama
    path = build_tiny_llama(tmp_path_factory.mktemp("device") / "tiny", seed=0)
    tiny_model().save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    return str(path)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_INT4KV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_INT4KV_KL_BUDGET", raising=False)
    monkeypatch.setattr(auto, "settings_from_env", lambda: FAST)


def config_with(dtype):
    return tiny_model().config.__class__(dtype=dtype)


@pytest.mark.parametrize("requested, stored, served", [
    (None, "bfloat16", torch.bfloat16), ("auto", "float16", torch.float16),
    ("auto", "float32", torch.bfloat16),  # vLLM downcasts fp32 checkpoints
    ("float", "bfloat16", torch.float32), ("half", "float32", torch.float16),
    (torch.float16, "bfloat16", torch.float16)])
def test_serving_dtype_is_what_vllm_picks(requested, stored, served):
    assert serving_dtype(requested, config_with(stored)) == served


def test_gpus_without_bf16_serve_fp32_checkpoints_in_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert serving_dtype("auto", config_with("float32")) == torch.float16
    assert calibration_device.device_type("auto") == "cuda"  # a spread model computes on the GPUs


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'int8': use one of auto, half, float16"):
        serving_dtype("int8")


def test_calibrate_default_dtype_computes_the_engines_key(folder):
    """`vllm serve` passes the dtype vLLM resolved (bf16 for this fp32 checkpoint); the command, left at
    --dtype auto, must compute the same key, or the engine calibrates a second time."""
    settings, prompts = FAST, calibration.load_prompts(FAST.n_prompts)

    def key(dtype, device):
        head_dim, elem_bytes, served = auto._model_facts(folder, None, dtype, False)
        return auto.calibration_key(folder, settings, prompts, head_dim, elem_bytes, None, served, device)

    assert key("auto", "cuda") == key(torch.bfloat16, "cuda") == key(None, "cuda")
    assert key("auto", "cuda") != key(torch.float32, "cuda") != key(torch.float16, "cuda")
    assert key("auto", "cpu") == key(torch.bfloat16, "cpu")  # CPU computes in fp32 either way
    assert key(torch.float32, "cpu") != key(torch.bfloat16, "cpu")  # but 16-bit planes change size


@pytest.mark.parametrize("device", [None, "auto"])
def test_a_decision_stored_by_calibrate_is_found_at_engine_start(folder, device, capsys):
    if device == "auto":
        pytest.importorskip("accelerate")
    args = ["calibrate", folder, *FAST_ARGS] + ([] if device is None else ["--device", device])
    assert main(args) == 0
    out = capsys.readouterr().out
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert "stored: " in out and f"VLLM_INT4KV_POLICY=auto finds it on {here} with --dtype bfloat16" in out
    decision = auto.resolve_auto(folder, dtype=torch.bfloat16)  # what the engine passes
    assert decision.source == "cache"
    assert "<- decision" in out and decision.policy.name in out


def test_weights_are_counted_without_loading(folder):
    model = tiny_model()
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model.config, torch.bfloat16) == 2 * params
    assert weight_bytes(model.config, torch.float32) == 4 * params
    quantized = model.config.__class__(quantization_config={"quant_method": "awq"})
    assert weight_bytes(quantized, torch.bfloat16) is None  # loads smaller than its parameter count


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(folder):
    config = tiny_model().config
    need = weight_bytes(config, torch.bfloat16)
    check_fits(folder, config, torch.bfloat16, "cuda", free=need)  # fits exactly
    with pytest.raises(CalibrationOutOfMemory) as err:
        check_fits(folder, config, torch.bfloat16, "cuda:0", free=need - 1)
    message = str(err.value)
    assert "does not fit on cuda:0" in message and "GiB of weights in bfloat16" in message
    assert all(way in message for way in WAYS_OUT) and folder in message
    check_fits(folder, config, torch.float32, "cpu")  # no free-memory figure for CPU: nothing refused


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")


def test_running_out_of_memory_while_loading_says_what_to_do(folder, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(CalibrationOutOfMemory, match="Tried to allocate 2.00 GiB; at engine start-up"):
        auto.resolve_auto(folder, dtype=torch.bfloat16)
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", folder, *FAST_ARGS])
    assert str(exit_.value).startswith("vllm-int4kv calibrate: vllm-int4kv: the auto-policy calibration")
    assert all(way in str(exit_.value) for way in WAYS_OUT)


def test_running_out_of_memory_in_a_forward_pass_says_what_to_do():
    model = tiny_model()
    with Session(model, token_ids(n=1, length=32)) as session:
        model.forward = out_of_memory
        with pytest.raises(CalibrationOutOfMemory, match="does not fit on cpu"):
            session.measure("k4v4", (4, 4, None, False))


def test_spreading_without_accelerate_says_to_install_it(folder, monkeypatch):
    real_find_spec = calibration_device.importlib.util.find_spec
    monkeypatch.setattr(calibration_device.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(PlacementError, match="pip install accelerate"):
        calibration_device.placement("auto")
    with pytest.raises(SystemExit, match="vllm-int4kv layers: .*pip install accelerate"):
        main(["layers", folder, *FAST_ARGS, "--device", "auto"])
